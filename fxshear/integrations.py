"""Make ``TrainingArguments(torch_compile_backend="fxshear")`` work with Hugging Face.

Why a shim: transformers hands the backend name to accelerate, whose ``DynamoBackend`` is a
closed Enum of the backends it knows; any other registered torch.compile backend is rejected
with "'FXSHEAR' is not a valid DynamoBackend" before torch ever sees it.  We add one member,
``FXSHEAR``, whose lower-cased value accelerate then passes to ``torch.compile(backend=...)``,
which finds fxshear through its ``torch_dynamo_backends`` entry point.
"""

from __future__ import annotations

import importlib.util

from .log import log

BACKEND_NAME = "FXSHEAR"


def register_accelerate_backend() -> bool:
    """Add ``FXSHEAR`` to accelerate's ``DynamoBackend``; True if accelerate now accepts it."""
    if importlib.util.find_spec("accelerate") is None:
        return False
    try:
        from accelerate.utils.dataclasses import DynamoBackend
    except ImportError as error:  # accelerate moved it: say so, never break import fxshear
        log.info("fxshear: could not register with accelerate: %s", error)
        return False
    if BACKEND_NAME in DynamoBackend.__members__:
        return True
    member = str.__new__(DynamoBackend, BACKEND_NAME)
    member._name_ = BACKEND_NAME
    member._value_ = BACKEND_NAME
    member.__objclass__ = DynamoBackend
    DynamoBackend._member_map_[BACKEND_NAME] = member
    DynamoBackend._value2member_map_[BACKEND_NAME] = member
    DynamoBackend._member_names_.append(BACKEND_NAME)
    return DynamoBackend(BACKEND_NAME) is member
