# Placeholder until this kernel family lands.

def fused_recurrent_simple_gla(*args, **kwargs):
    raise NotImplementedError("fused_recurrent_simple_gla is not implemented yet")


def fused_recurrent_gla(*args, **kwargs):
    raise NotImplementedError("fused_recurrent_gla is not implemented yet")


def fused_recurrent_delta_rule(*args, **kwargs):
    raise NotImplementedError("fused_recurrent_delta_rule is not implemented yet")


def fused_recurrent_gated_delta_rule(*args, **kwargs):
    raise NotImplementedError("fused_recurrent_gated_delta_rule is not implemented yet")


