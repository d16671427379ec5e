"""Registration of SPEFT with peft: a `PeftType.SPEFT` member and the peft method mappings.

peft's `PeftType` is a closed `str` enum and `register_peft_method` only accepts its members, so the member is added
by `integrations.compat.extend_peft_type`. Both steps are idempotent: importing or reloading `hf_speft` again leaves
one consistent registration.
"""

from __future__ import annotations

from peft.utils.peft_types import register_peft_method

from .integrations.compat import extend_peft_type

METHOD_NAME = "speft"
PREFIX = "speft_"


SPEFT_PEFT_TYPE = extend_peft_type(METHOD_NAME.upper())


def register_sparse_peft(config_cls: type, model_cls: type) -> None:
    """Register SPEFT in peft's mappings once; a re-import of the same classes replaces the earlier entries."""
    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(SPEFT_PEFT_TYPE)
    if registered is not None:
        if (registered.__module__, registered.__qualname__) != (model_cls.__module__, model_cls.__qualname__):
            raise KeyError(
                f"peft type {SPEFT_PEFT_TYPE.value!r} is already registered to {registered.__module__}."
                f"{registered.__qualname__}; hf_speft cannot register {model_cls.__qualname__} under the same name."
            )
        for mapping in (
            PEFT_TYPE_TO_CONFIG_MAPPING,
            PEFT_TYPE_TO_TUNER_MAPPING,
            PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
            PEFT_TYPE_TO_PREFIX_MAPPING,
        ):
            mapping.pop(SPEFT_PEFT_TYPE, None)
    register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=PREFIX,
                         is_mixed_compatible=True)
