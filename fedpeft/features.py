"""The built-in features whose settings make up a run's config, one line each.

Importing a feature's settings module declares its sections (:data:`fedpeft.settings.SECTIONS`);
:mod:`fedpeft.config` imports this module so that every built-in key is known before a
run config is read.  Each module is light (no PyTorch, Opacus, Flower or datasets): what a
section needs of a registry (partitioners, strategies, PEFT methods) it loads when checked.
An extension outside the package declares its section in its own module; importing that
module is its registration, and nothing here changes.
"""

# One line per built-in feature; the order is the order of the sections in a run config.
import fedpeft.codecs.settings  # codec.*, codec.<name>.*
import fedpeft.data.settings  # data.*
import fedpeft.models.settings  # model.*, peft.*, and each PEFT method's section
import fedpeft.privacy.settings  # dp.*
import fedpeft.recovery.settings  # failures.*
import fedpeft.server.settings  # server.*, strategy.*
import fedpeft.tasks.settings  # noqa: F401  -- task.*, train.*; lm.* (the causal-LM task's)
