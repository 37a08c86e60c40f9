"""Model classes that let VLMEvalKit and lmms-eval run Cheers checkpoints.

``cheers.eval.adapters.vlmevalkit.CheersVLM`` (VLMEvalKit ``BaseModel``: ``generate_inner``)
and ``cheers.eval.adapters.lmms_eval.CheersLMMs`` (lmms-eval ``lmms``: ``generate_until``).
Both import without their toolkit installed and subclass its base class when it is.
"""
