"""Hugging Face remote code shipped inside every svdexp checkpoint folder.

The two modules here are copied verbatim into a saved checkpoint (see ``svdexp.checkpoint``) so that
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works where svdexp is not installed.
They hold one generic configuration (``SvdexpConfig``, ``model_type`` ``"svdexp"``) and one model class
(``SvdexpForCausalLM``) for every decoder family: the model class builds the family's own causal-LM class from the
saved base configuration and swaps the low-rank layers in by name. ``svdexp.checkpoint`` imports the same skeleton
helpers (``base_config_from_dict``, ``causal_lm_class``, ``swap_in_low_rank``) for its loader without remote code.
They must stay self-contained: import only ``torch``, ``transformers`` and each other (relatively), never svdexp.
"""

REMOTE_FILES = ("configuration_svdexp.py", "modeling_svdexp.py")
