"""The toy PEFT method as an extension module, registry line included: named in the run
config's ``extensions`` key, it is imported (and so registered) by every process that
reads the config before the rest of the config is read."""

from fedpeft.models import register_method
from tests.unit.toys.peft_method import NormsConfig, apply

register_method("toy-norms", "LayerNorm tuning + the head", is_peft_adapter=False, settings=NormsConfig)(
    apply
)
