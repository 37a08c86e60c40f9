"""The ``shapes`` flavour: the whole Cheers architecture, small enough to train on a CPU.

64 px images, an 8x8 latent grid of 16 channels (a 4x VAE + 2x2 patchify), a 2-layer
semantic encoder with 8 px patches, 16 LLM tokens per image, a 4-layer LLM of width 192.
It predicts the clean latent and derives the velocity from it (``transport.prediction="x1"``,
which gave clean samples where direct velocity prediction left speckle at this size); plain
Euler to t = 1 (no official extra step) and no dummy image prefix. The compressor's tokens
are scaled to a fixed RMS (``compressor_out_rms``): trained from scratch, the image tokens otherwise
grow until the prompt no longer moves them (measured: the text's effect on the image-token
states fell from 3.4% at initialisation to 0.2% after 900 steps; CFG then did nothing).
The time embedding reads ``1000 t`` (``head.time_scale``): with t as is most of its frequencies
are flat over [0, 1] (measured: flow loss 1.08 against 1.26 after 400 steps).
The demo pretrains the semantic encoder on dense patch labels and keeps it frozen
(``cheers.shapes.semantic``), as the released model starts from SigLIP2.
Three of the VAE's four latent channels are the image's RGB, average-pooled to the latent grid
(``vae.pooled_rgb_latent``); the fourth is learned. A learned latent put colour in its norm:
halfway from the background to a red circle decoded green, then black, so every
half-confident prediction changed hue (generated blobs came out green, black and purple
whatever the prompt said). With the pooled channels a mix of latents decodes to the mix of
the images (measured after 500 steps of text-to-image training from the same start: 0.55
of the foreground pixels in the prompt's colour, against 0.27). The 15-minute demo used the
prompt only once its learning-rate warm-up counted optimiser steps rather than wall-clock time
(benchmarks/RESULTS.md, session 5).
The LLM's image tokens and stage B's input also read the noisy latent itself through a trainable
linear map (``tokenizer.latent_to_llm``, ``head.latent_to_stage_b``; the released model sees xt
only through its pixel decoder and SigLIP2, which it trains and the demo keeps frozen). After
650 text-to-image steps from the same start, x1 MSE at t = 0.5 / 0.7 was 0.070 / 0.047 without
them and 0.037 / 0.013 with stage B's path, and the flow loss 0.79 against 0.40. The 15-minute
demo's flow loss fell from 1.07 to 0.55, but its images are still blobs far from the floors.
"""

from __future__ import annotations

from cheers.config import (
    FlowHeadConfig,
    LLMConfig,
    ModelConfig,
    SiglipConfig,
    SpecialTokens,
    TokenizerConfig,
    TransportConfig,
    VAEConfig,
    register_flavour,
)

SHAPES_VOCAB = 512


def shapes_flavour() -> ModelConfig:
    return ModelConfig(
        flavour="shapes",
        llm=LLMConfig(vocab_size=SHAPES_VOCAB, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0),
        tokenizer=TokenizerConfig(
            image_size=64,
            vae=VAEConfig(ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, decoder_ch=16, decoder_ch_mult=[1, 2, 4],
                          decoder_num_res_blocks=0, z_channels=4, norm_groups=8, pooled_rgb_latent=True),
            siglip=SiglipConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                patch_size=8, image_size=64, use_head=False),
            compressor_hidden=256,
            compressor_out_rms=0.05,  # image tokens at the scale of word embeddings, or they drown the prompt
            latent_to_llm=True,
        ),
        head=FlowHeadConfig(stage_a_blocks=2, stage_a_heads=6, stage_a_kv_heads=2, stage_b_blocks=2,
                            stage_b_heads=4, stage_b_kv_heads=2, mlp_ratio=2, stage_b_positions="raster",
                            time_scale=1000.0, latent_to_stage_b=True),
        transport=TransportConfig(prediction="x1", x1_loss_t_min=0.25, cfg_drop_rate=0.1, sample_steps=20, sample_shift=1.0,
                                  cfg_scale=3.0, official_last_step=False),
        tokens=SpecialTokens(pad=0, chat_start=1, eos=2, image=3, image_gen=4, im_start=5, im_end=6, no_mean=7),
        max_seq_len=256,
        dummy_image_prefix=False,
    )


register_flavour("shapes", shapes_flavour)
