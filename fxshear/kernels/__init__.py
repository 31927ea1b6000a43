"""fxshear's custom ops. Importing this package registers them with torch.library."""

from . import act2bit  # noqa: F401  (registers fxshear::act2bit and fxshear::act2bit_backward)
