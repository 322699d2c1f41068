"""STRATO-PEFT: cost-aware, learned allocation of LoRA adapters.

Nothing heavy is imported here: ``import strato_peft`` must stay instant so that the
command line answers ``--help`` and config errors before torch loads.
"""

__version__ = "0.1.0"
