# Placeholder until this kernel family lands.

def chunk_simple_gla(*args, **kwargs):
    raise NotImplementedError("chunk_simple_gla is not implemented yet")


def chunk_gla(*args, **kwargs):
    raise NotImplementedError("chunk_gla is not implemented yet")


