"""cheers: a unified multimodal model (understanding and flow-matching generation with one LLM)."""

__version__ = "0.1.0"
