# Placeholder until this kernel family lands.

def chunk_delta_rule(*args, **kwargs):
    raise NotImplementedError("chunk_delta_rule is not implemented yet")


def chunk_gated_delta_rule(*args, **kwargs):
    raise NotImplementedError("chunk_gated_delta_rule is not implemented yet")


