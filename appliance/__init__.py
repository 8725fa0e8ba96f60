"""The air-gapped appliance: bundle install, hybrid retrieval, cited answers on CPU.

This package never imports torch, transformers, peft, trl, mergekit or textual
(tests/test_isolation.py proves it in a fresh interpreter).
"""

import os

__version__ = "0.1.0"

# The appliance never talks to a model hub; make every library that might try fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
