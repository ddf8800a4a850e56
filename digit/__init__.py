"""DiGIT: discriminative image tokens -> GPT -> pixels, as a DVC pipeline.

Shared code for the stages in `stages/`. Stages import from here; modules here
never import stages.
"""

__version__ = "0.1.0"
