"""cheers: a unified multimodal model (understanding and flow-matching generation with one LLM)."""

__version__ = "0.1.0"

import logging as _logging

# importing torchao (through peft and diffusers) logs deprecation notices of those libraries that
# a user of cheers cannot act on, before every command's own output
for _name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
