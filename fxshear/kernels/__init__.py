"""fxshear's custom ops. Importing this package registers them with torch.library, together with
the aten math each is lowered to on CPU after partitioning."""

from . import (  # noqa: F401
    act2bit,
    act2bit_inductor,
    act_from_output,
    attention,
    dropout_bits,
    linear_cross_entropy,
    norms,
    prune,
    prune_attention,
    returned_linear,
    reversible_mark,
    shared_linear,
)
