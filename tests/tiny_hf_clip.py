"""A tiny, randomly initialised Hugging Face ``CLIPModel`` (float64, nothing downloaded) and token pairs for it,
shared by the tests of the Hugging Face adapter and of the curvature on a real CLIP architecture."""
from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from problems import EOS, IMG, SEQ, VOCAB, token_pairs as pairs  # noqa: F401  (re-exported)


def tiny_clip(seed=0, attn="sdpa"):
    """One block per tower, width 8, projection 4, in eval mode."""
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=SEQ, eos_token_id=EOS, bos_token_id=0,
                          pad_token_id=1, projection_dim=4)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMG, patch_size=4, num_channels=3, projection_dim=4)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=4)
    return CLIPModel._from_config(cfg, attn_implementation=attn).double().eval()
