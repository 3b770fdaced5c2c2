"""Hugging Face remote code shipped inside every svdexp checkpoint folder.

The two modules here are copied verbatim into a saved checkpoint (see ``svdexp.checkpoint``) so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works where svdexp is not installed.
They must stay self-contained: import only ``torch``, ``transformers`` and each other (relatively).
"""

REMOTE_FILES = ("configuration_svdexp.py", "modeling_svdexp.py")
