"""(c) ``clip_lora``: a peft LoRA fine-tuning of a tiny Hugging Face CLIP, float64, nothing downloaded.

``tests/test_lora_loo.py`` checks ECIF against leave-one-out retraining on ``clip_lora()``; the evaluation suite
uses the same problem. Construction (all seeds fixed; ``seed`` offsets every one of them, 0 = the test's):

- Base model: a tiny randomly initialised ``transformers.CLIPModel`` (hidden 8, 1 layer per tower, projection 8,
  logit scale fixed at 5), "pre-trained" on domain A: 150 Adam steps over all its weights on
  128 pairs of 8 latent classes (an image is its class's 3×8×8 prototype plus noise; a caption is BOS, 4 tokens
  drawn from its class's 4 tokens, EOS). It then matches classes across modalities, so the contrastive loss is in
  a sensible regime and a misaligned caption means something. (Straight from the random init, fine-tuning only
  memorised the training pairs and raised the validation loss.)
- Fine-tuning: LoRA r = 2 on ``q_proj``, ``v_proj``, ``visual_projection``, ``text_projection`` (P = 192) with
  peft's *standard* init (random A, B = 0), so fine-tuning starts at the pre-trained model, and θ_ref = that init:
  R is the fine-tuning loss plus weight decay towards the starting point, as LoRA is used. (test_hf_clip needs
  ``init_lora_weights=False`` because it takes influences at the untrained model, where B = 0 makes ∇F vanish on
  A; here they are taken at θ̂, where B ≠ 0.) n = 32 pairs of a shifted domain B (new image prototypes,
  correlated with A's); fixed batches of 8 that each hold every class once; pairs 0 and 9 carry another class's
  caption. F = the docs/math.md §2 contrastive loss of 16 held-out domain-B pairs as one batch (``Problem.F``, the ``F``
  of ``ECIF.influence(Xv, Yv)``); with seed 0 and batches of 8 fine-tuning lowers it from 59.11 to 51.58.
- Optimum: ``ecif_fast.train``, L-BFGS (500 iterations) then Newton (5 steps), to max|∇R| < 1e-9 (reached:
  ~1e-13); L-BFGS alone stalls at max|∇R| ~ 1e-7…1e-6, where R's decrease is below float64 resolution.
  ``Problem.retrain`` runs the same two stages, warm-started from θ̂, same batches with the pairs deleted (docs/math.md §3).
- Damping δ = 300: see ``tests/test_lora_loo.py`` for the Hessian spectrum and why this δ.

The LoRA parameters are the only trainable ones (the base is frozen), so ``params=None`` selects exactly them.
"""
from __future__ import annotations

import copy
import functools
import math

import torch

import ecif_fast as ef
from ecif_fast.core.batches import resolve_batches
from ecif_fast.core.loss import contrastive_loss

from .problems import Problem, batch_ids

VOCAB, SEQ, IMG, EOS = 40, 6, 8, 39
CLASSES = 8
MISALIGNED = (0, 9)
RANK, TARGETS, P = 2, ("q_proj", "v_proj", "visual_projection", "text_projection"), 192
#: retraining: ``ecif_fast.train`` once per stage (tol = ``Problem.tol``, ef.train's default 1e-10)
TRAIN_STAGES = ({"method": "lbfgs", "max_iter": 500}, {"method": "newton", "max_iter": 5})


def tiny_clip(seed: int = 0):
    """The randomly initialised ``CLIPModel`` (float64, eval mode, logit scale 5)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=SEQ, eos_token_id=EOS, bos_token_id=0,
                          pad_token_id=1, projection_dim=8)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMG, patch_size=4, num_channels=3, projection_dim=8)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    clip = CLIPModel._from_config(cfg, attn_implementation="sdpa").double().eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(5.0))
    return clip


def prototypes(seed: int = 0):
    """``(domain A, domain B)`` class image prototypes, each ``(8, 3, 8, 8)``: A for pre-training, B (correlated
    with A) for fine-tuning and validation."""
    g = torch.Generator().manual_seed(123 + seed)
    a = torch.randn(CLASSES, 3, IMG, IMG, generator=g, dtype=torch.float64)
    b = (a + 0.7 * torch.randn(CLASSES, 3, IMG, IMG, generator=g, dtype=torch.float64)) / math.sqrt(1.49)
    return a, b


def pairs(n: int, seed: int, protos: torch.Tensor, misaligned=()):
    """``(images (n, 3, 8, 8), token ids (n, 6))``: every consecutive block of 8 pairs holds each class once;
    the pairs ``misaligned`` get another class's caption."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.cat([torch.randperm(CLASSES, generator=g) for _ in range(-(-n // CLASSES))])[:n]
    px = protos[cls] + 0.5 * torch.randn(n, 3, IMG, IMG, generator=g, dtype=torch.float64)
    caption = cls.clone()
    bad = torch.tensor(misaligned, dtype=torch.long)
    caption[bad] = (cls[bad] + 1 + torch.randint(0, CLASSES - 1, (len(bad),), generator=g)) % CLASSES
    per = (EOS - 2) // CLASSES
    ids = 2 + caption[:, None] * per + torch.randint(0, per, (n, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 0, EOS
    return px, ids


@functools.lru_cache(maxsize=4)
def pretrained_clip(seed: int = 0):
    """The base model after pre-training on domain A, frozen (cached: deep-copy before modifying)."""
    clip = tiny_clip(seed)
    model = ef.wrap(clip)
    X, Y = pairs(128, 7 + seed, prototypes(seed)[0])
    opt = torch.optim.Adam([p for p in clip.parameters() if p is not clip.logit_scale], lr=1e-2)
    for _ in range(150):
        # the materialising loss: its float64 rounding is what the recorded LoRA numbers were computed with
        loss = contrastive_loss(model.encode_image(X), model.encode_text(Y), 5.0, resolve_batches(32, len(X)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip.requires_grad_(False)


def lora_model(seed: int = 0):
    """``wrap(peft LoRA model)`` at the LoRA init (= the pre-trained model, since B = 0)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(pretrained_clip(seed))
    torch.manual_seed(seed)  # the LoRA A init
    return ef.wrap(get_peft_model(base, LoraConfig(r=RANK, target_modules=list(TARGETS))).double())


def clip_lora(seed: int = 0, batch: int | None = 8, damping: float = 300.0, n_train: int = 32,
              n_val: int = 16) -> Problem:
    """(c) The LoRA fine-tuned to θ̂ (see the module docstring); ``batch=None``: "all" negatives (one batch).

    ``Problem.theta_ref`` is the LoRA init, ``Problem.train_kwargs`` the two stages :data:`TRAIN_STAGES`.
    """
    from ecif_fast.models.params import select_params

    model = lora_model(seed)
    space = select_params(model)
    if space.size != P or not all("lora_" in n for n in space.names):
        raise RuntimeError(f"clip_lora: expected the {P} LoRA parameters, got {space.size}: {space.names}")
    protos = prototypes(seed)[1]
    X, Y = pairs(n_train, 1 + seed, protos, MISALIGNED)
    Xv, Yv = pairs(n_val, 2 + seed, protos)
    misaligned = torch.zeros(n_train, dtype=torch.bool)
    misaligned[list(MISALIGNED)] = True
    negatives = "all negatives" if batch is None else f"batches of {batch}"
    pb = Problem("clip_lora", f"tiny HF CLIP (pre-trained on domain A) + peft LoRA r={RANK} (P={P}) fine-tuned on "
                 f"domain B, captions as tokens, n={n_train} ({len(MISALIGNED)} misaligned), {negatives}, "
                 f"δ={damping}", model, X, Y, Xv, Yv, batch_ids(n_train, batch), damping, space.flat(model),
                 train_kwargs=list(TRAIN_STAGES), params=None, misaligned=misaligned, tol=1e-10)
    pb.model = pb.retrain(torch.ones(n_train, dtype=torch.bool))  # fine-tune from the LoRA init to θ̂
    return pb
