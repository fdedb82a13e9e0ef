"""The zoo's multimodal family (``mllm``): LLaVA models over a zoo base LM.

Each member is a real ``LlavaForConditionalGeneration``: a small SigLIP vision tower (one
grayscale channel, 12 x 12 input), the two-layer MLP projector and, as its language model, a
copy of its parent zoo LM (``small/base`` for the fusion members). Members differ in what their
encoder sees (``ImageView``: the top or the bottom band of rows of the canvas), so they are
complementary: each sees a slice of every letter, and which slice holds more of the glyphs
changes from image to image (the vertical offset), so a member alone reads some strings whole
and misreads letters of others.

Training is LLaVA's two stages (Liu et al., "Visual Instruction Tuning"), scaled to the zoo:

1. alignment: the vision tower and projector learn ``ocr`` with the LM frozen;
2. instruction tuning: everything trains on ``ocr`` + ``vrev``, each step also replaying the
   base's text mixture (``FINETUNE_REPLAY``, as the zoo's text fine-tunes do) so the LM keeps
   its text skills.

The zoo adds options of ours (``train_member``), all aimed at members whose LMs merge: null
visual tokens around the block and two renderings of one string in one prompt (the LM learns to
read its tokens among others and to pool two streams, as a fused LM must), a letter anchor (each
visual token pulled towards the shared LM's embedding of its letter, so every member's encoder
writes where the text LM reads letters), one data seed for the family and a reduced LM learning
rate (smaller, more shared LM deltas). Measured in the VisionFuse section of bench/README.md.

Image placeholders are ``<unk>`` (id 3), which the character tokenizer never produces from
text, so the members keep the zoo's vocabulary and stay mergeable with the text family.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

import torch

from engine.errors import ConfigError
from engine.evaluate.tokenizer import BOS_ID, EOS_ID, encode_chars
from engine.evaluate.vision_scoring import IMAGE_TOKEN_ID, VisualStream
from engine.evaluate.vision_tasks import CANVAS_H, VISION_TASKS, ImageView, train_images
from engine.zoo.train import IGNORE, BatchSampler, TrainSpec, causal_lm_loss, lr_at

VIEW_FILE = "image_view.json"  # a member folder's view of the canvas (see ImageView)
LM_PREFIX = "model.language_model."  # LLaVA's LM tensors; the base LM's are "model."
DATA_SEED_NAME = "mllm:data"  # the family data seed is stage_seed(zoo seed, this)


def vision_config(patch_size: int, hidden: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=2, num_attention_heads=4, num_channels=1,
                              image_size=CANVAS_H, patch_size=patch_size, vision_use_head=False)


def llava_config(text_config, patch_size: int, hidden: int):
    from transformers import LlavaConfig

    n_tokens = (CANVAS_H // patch_size) ** 2
    return LlavaConfig(vision_config=vision_config(patch_size, hidden), text_config=text_config,
                       image_token_id=IMAGE_TOKEN_ID, projector_hidden_act="gelu",
                       vision_feature_select_strategy="full", vision_feature_layer=-1,
                       image_seq_length=n_tokens, multimodal_projector_bias=True,
                       tie_word_embeddings=False, architectures=["LlavaForConditionalGeneration"])


def lm_state_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LLaVA state dict's language model under the base LM's names
    (``model.language_model.X`` -> ``model.X``; ``lm_head.weight`` stays)."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(LM_PREFIX):
            out["model." + name[len(LM_PREFIX):]] = tensor
        elif name.startswith("lm_head."):
            out[name] = tensor
    return out


def new_member(parent_lm, patch_size: int, hidden: int, seed: int):
    """A LLaVA model whose LM is a copy of ``parent_lm`` (a ``LlamaForCausalLM``) and whose
    vision tower and projector are freshly initialised from ``seed``."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(parent_lm.config, patch_size, hidden))
    model = model.float()
    model.model.language_model.load_state_dict(parent_lm.model.state_dict())
    model.lm_head.load_state_dict(parent_lm.lm_head.state_dict())
    return model


def streams_of(model, view: ImageView) -> list[VisualStream]:
    return [VisualStream(model.model.vision_tower, model.model.multi_modal_projector, view,
                         model.config.vision_feature_layer)]


def gapped_positions(rng: random.Random, n_tokens: int, length: int, gap: int) -> list[int]:
    """Position ids of one ``[<bos>; n_tokens visual; text]`` row with a random gap of 0..gap
    positions before the visual block and another after it (ours; gap 0: plain 0..length-1).

    RoPE makes attention depend on relative positions only, so a member trained on one fixed
    layout learns "the letters are k positions back". In a fused prompt the other members'
    tokens shift that offset; random gaps on both sides, drawn alike for every member, teach
    the LM to find its tokens by content instead (the layout of no fusion is assumed)."""
    if gap <= 0:
        return list(range(length))
    before, after = rng.randint(0, gap), rng.randint(0, gap)
    visual = [1 + before + j for j in range(n_tokens)]
    start = 1 + before + n_tokens + after
    return [0] + visual + [start + j for j in range(length - 1 - n_tokens)]


def _vision_batch(rng: random.Random, images_stream, tasks: dict[str, float], size: int,
                  n_tokens: int, view: ImageView, gap: int = 0, with_strings: bool = False):
    import numpy as np

    names, weights = list(tasks), list(tasks.values())
    rows, images, strings = [], [], []
    for _ in range(size):
        image, string = next(images_stream)
        task = VISION_TASKS[rng.choices(names, weights)[0]]
        prompt = [BOS_ID] + [IMAGE_TOKEN_ID] * n_tokens + encode_chars(task.text)
        answer = encode_chars(task.answer(string)) + [EOS_ID]
        full = prompt + answer
        rows.append((full, [IGNORE] * len(prompt) + answer,
                     gapped_positions(rng, n_tokens, len(full), gap)))
        images.append(image)
        strings.append(string)
    ids = torch.tensor([r[0] for r in rows], dtype=torch.long)  # equal lengths: no padding
    labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
    positions = torch.tensor([r[2] for r in rows], dtype=torch.long)
    batch = ids, labels, view.pixel_values(np.stack(images)), positions
    return (*batch, strings) if with_strings else batch


def null_tokens(reference: torch.Tensor, batch: int, count: int) -> torch.Tensor:
    """``(batch, count, H)`` null visual tokens: Gaussian noise with the per-dimension mean and
    spread of ``reference``'s tokens (detached): shaped like a visual token, carrying no letter."""
    flat = reference.detach().reshape(-1, reference.shape[-1])
    return torch.randn(batch, count, reference.shape[-1]) * flat.std(0) + flat.mean(0)


def blocks_prompt(model, ids, blocks: list[torch.Tensor], rng: random.Random,
                  most: int) -> tuple[torch.Tensor, int]:
    """``([<bos>; nulls; block 1; nulls; ...; block m; nulls; text], extra)``: the prompt's
    embeddings with the visual blocks (each ``(B, n, H)``) in order and k null tokens (0..most,
    one draw per batch) split at random into the m + 1 gaps of each row (ours). ``extra``: how
    many tokens the row has beyond ``ids``' layout (``[<bos>; n placeholders; text]``).

    In a fused prompt the other members' tokens sit where the nulls do; learning to read its
    letters with unrelated visual tokens around them, at any offset, is what lets the LM read
    its block in the fusion (no slot of a fusion is assumed: the split and the count are
    symmetric). With one block and k = 0 this is LLaVA's own prompt (placeholders filled)."""
    embed = model.get_input_embeddings()
    n = blocks[0].shape[1]
    text, bos = embed(ids[:, 1 + n:]), embed(ids[:, :1])
    k = rng.randint(0, most)
    noise = null_tokens(torch.cat(blocks, dim=1), ids.shape[0], k)
    rows = []
    for b in range(ids.shape[0]):
        edges = [0, *sorted(rng.randint(0, k) for _ in blocks), k]
        parts = [bos[b]]
        for j, block in enumerate(blocks):
            parts += [noise[b, edges[j]:edges[j + 1]], block[b]]
        parts += [noise[b, edges[-2]:edges[-1]], text[b]]
        rows.append(torch.cat(parts))
    return torch.stack(rows), k + (len(blocks) - 1) * n


def blocks_loss(model, ids, labels, blocks: list[torch.Tensor], rng: random.Random,
                most: int) -> torch.Tensor:
    """The answer's cross-entropy given ``blocks_prompt``'s prompt."""
    embeds, extra = blocks_prompt(model, ids, blocks, rng, most)
    labels = torch.cat([labels[:, :1], torch.full((labels.shape[0], extra), IGNORE),
                        labels[:, 1:]], dim=1)
    return answer_loss(model(inputs_embeds=embeds, use_cache=False).logits, labels)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy over the labelled (answer) positions."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE)


def vision_loss(model, ids, labels, pixel_values, position_ids=None) -> torch.Tensor:
    return answer_loss(model(input_ids=ids, pixel_values=pixel_values,
                             position_ids=position_ids, use_cache=False).logits, labels)


class LetterAnchor:
    """The letter anchor (ours): a loss pulling visual token i towards the shared LM's input
    embedding of letter i of the image's string (the fold puts letter i in token i).

    The table is the parent LM's embeddings when training starts (a detached copy), so every
    member of a family is pulled towards the same targets: their encoders then write into one
    region of the LM's input space, where the text LM already reads letters, and the LM needs a
    smaller (and more shared) delta to read them. The loss is the squared distance relative to
    the letters' mean squared norm (1.0 for all-zero tokens), averaged over tokens."""

    def __init__(self, model, n_tokens: int):
        from engine.evaluate.tasks import LETTERS
        from engine.evaluate.vision_tasks import N_LETTERS

        if n_tokens != N_LETTERS:
            raise ConfigError(f"the letter anchor needs one visual token per letter "
                              f"({N_LETTERS}), this member has {n_tokens}")
        self.table = model.get_input_embeddings().weight.detach().clone().float()
        letters = torch.tensor(encode_chars(LETTERS), dtype=torch.long)
        self.scale = float(self.table[letters].pow(2).sum(-1).mean())

    def loss(self, visual: torch.Tensor, strings: list[str]) -> torch.Tensor:
        ids = torch.tensor([encode_chars(s) for s in strings], dtype=torch.long)
        return (visual.float() - self.table[ids]).pow(2).sum(-1).mean() / self.scale


def train_member(model, view: ImageView, spec: TrainSpec, align_steps: int, align_lr: float,
                 seed: int, on_step: Callable[[int, float], None] | None = None,
                 position_gap: int = 0, distractors: int = 0, lm_lr_scale: float = 1.0,
                 anchor: float = 0.0, second_rendering: float = 0.0,
                 data_seed: int | None = None) -> list[float]:
    """Both LLaVA stages in place: ``align_steps`` of alignment (tower + projector, LM frozen,
    ``ocr`` only, ``align_lr``), then ``spec.steps - align_steps`` of instruction tuning of
    every weight on the vision sources of ``spec.mixture`` plus its text replay sources.
    The options below are ours (0 / 1.0 / None: LLaVA's recipe):

    - ``position_gap`` > 0: stage 2 draws random position gaps around the visual block
      (``gapped_positions``);
    - ``distractors`` > 0: stage 2 puts 0..distractors null visual tokens around the block
      (``blocks_prompt``);
    - ``lm_lr_scale``: the LM's learning rate in stage 2 relative to the encoder's and
      projector's (LLaVA tunes its LM at a far lower rate than it aligns the projector);
    - ``anchor`` > 0: both stages add ``anchor`` x the letter-anchor loss (``LetterAnchor``);
    - ``second_rendering`` in (0, 1]: that share of stage-2 batches shows the member's encoder
      two renderings of the same string, two visual blocks one after the other (with
      0..distractors // 2 null tokens in the gaps), so the LM learns to pool two token streams
      about one string, as a fused model's LM must;
    - ``data_seed``: the seed of the training data (strings, renderings, task draws, null
      counts, text replay) instead of ``seed``; one value for a whole family gives its members
      the same batches, so their LM deltas answer the same examples.
    """
    import numpy as np

    from engine.evaluate.vision_tasks import render

    if second_rendering and position_gap:
        raise ConfigError("second_rendering and position_gap do not combine (the two-block "
                          "prompt has no gapped layout)")
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    data = seed if data_seed is None else int(data_seed)
    rng = random.Random(data)
    images = train_images(random.Random(data + 1))
    rerender = random.Random(data + 3)
    vision_mix = {k: v for k, v in spec.mixture.items() if k in VISION_TASKS}
    text_mix = {k: v for k, v in spec.mixture.items() if k not in VISION_TASKS}
    text_share = sum(text_mix.values())
    replay = BatchSampler(text_mix, random.Random(data + 2)) if text_mix else None
    n_tokens = model.config.image_seq_length
    letter_anchor = LetterAnchor(model, n_tokens) if anchor > 0 else None
    stream = streams_of(model, view)[0]
    losses: list[float] = []
    stages = [(align_steps, align_lr, {"ocr": 1.0}, False),
              (spec.steps - align_steps, spec.lr, vision_mix, True)]
    step_index = 0
    for steps, lr, mix, full in stages:
        gap = position_gap if full else 0
        lm_params = set(map(id, model.model.language_model.parameters())) | \
            set(map(id, model.lm_head.parameters()))
        for p in model.parameters():
            p.requires_grad_(full or id(p) not in lm_params)
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in lm_params], "scale": 1.0},
                  {"params": [p for p in params if id(p) in lm_params], "scale": lm_lr_scale}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr,
                                      betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
        stage_spec = TrainSpec(steps=steps, lr=lr, batch_size=spec.batch_size,
                               warmup=min(spec.warmup, max(1, steps // 5)))
        model.train()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, stage_spec) * group["scale"]
            ids, labels, pixels, positions, strings = _vision_batch(
                rng, images, mix, spec.batch_size, n_tokens, view, gap, with_strings=True)
            two = full and second_rendering > 0 and rng.random() < second_rendering
            if letter_anchor is not None or two or (full and distractors > 0):
                blocks = [stream.tokens_of_pixels(pixels)]
                if two:
                    again = np.stack([render(s, rerender) for s in strings])
                    blocks.append(stream.tokens_of_pixels(view.pixel_values(again)))
                most = (distractors // 2 if two else distractors) if full else 0
                loss = blocks_loss(model, ids, labels, blocks, rng, most)
                if letter_anchor is not None:
                    loss = loss + anchor * sum(letter_anchor.loss(b, strings)
                                               for b in blocks) / len(blocks)
            else:
                loss = vision_loss(model, ids, labels, pixels, positions)
            if full and replay is not None:
                size = max(1, round(spec.batch_size * text_share))
                text_ids, text_labels = replay.batch(size)
                loss = (1 - text_share) * loss + text_share * causal_lm_loss(model, text_ids,
                                                                            text_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step_index, losses[-1])
            step_index += 1
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


def read_view(folder: Path) -> ImageView:
    """A member folder's ``image_view.json``, read as the zoo's manifests are (a regular file
    inside the folder, bounded, strict JSON); a bad one is a named error."""
    from engine.io.reader import _read_small_json, _regular_file_inside

    root = Path(folder).resolve()
    if not (root / VIEW_FILE).is_file():
        raise ConfigError(f"multimodal model has no {VIEW_FILE} (the view of the image its "
                          "encoder takes)", path=folder)
    raw = _read_small_json(_regular_file_inside(root, VIEW_FILE, "image view"), ConfigError,
                           "image view")
    try:
        return ImageView.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"bad {VIEW_FILE}: {err}", path=folder) from None


def load_member(folder: str | Path):
    """``(model, view)`` of a LLaVA member folder, weights through the validating reader."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from engine.evaluate.scoring import _load_strict
    from engine.io import ModelFolder
    from engine.io.reader import refuse_unsafe_config

    with ModelFolder(folder, check_finite=True) as stored:
        config = dict(stored.config)
        refuse_unsafe_config(config, stored.path / "config.json", "config")
        if config.get("model_type") != "llava":
            raise ConfigError(f"not a LLaVA model (model_type {config.get('model_type')!r})",
                              path=stored.path)
        for key in ("transformers_version", "torch_dtype", "dtype", "auto_map"):
            config.pop(key, None)
        model = LlavaForConditionalGeneration(LlavaConfig.from_dict(config)).float()
        _load_strict(model, {n: stored.get_tensor(n) for n in stored.tensor_names},
                     path=stored.path)
    return model.eval(), read_view(Path(folder))


def plan_view(extra: dict) -> ImageView:
    from engine.evaluate.vision_tasks import BOTTOM_VIEW, TOP_VIEW

    return {"top": TOP_VIEW, "bottom": BOTTOM_VIEW}[extra["view"]]


def build_member(item, parent_lm, seed: int, on_step=None, family_seed: int | None = None):
    """Train the LLaVA member a zoo plan item describes, from its parent LM. A plan's
    ``data_seed: "family"`` trains on ``family_seed``'s data (the same for every member)."""
    extra = dict(item.extra)
    data_seed = extra.get("data_seed")
    if data_seed == "family":
        if family_seed is None:
            raise ConfigError(f"{item.path}: the plan asks for the family data seed, none given")
        data_seed = family_seed
    model = new_member(parent_lm, extra["patch_size"], extra["vision_hidden"], seed)
    train_member(model, plan_view(extra), item.spec, extra["align_steps"], extra["align_lr"],
                 seed, on_step, position_gap=int(extra.get("position_gap", 0)),
                 distractors=int(extra.get("distractors", 0)),
                 lm_lr_scale=float(extra.get("lm_lr_scale", 1.0)),
                 anchor=float(extra.get("anchor", 0.0)),
                 second_rendering=float(extra.get("second_rendering", 0.0)),
                 data_seed=data_seed)
    return model


def score_member(model, view: ImageView, tokenizer, n_eval: int) -> dict:
    """The zoo's text tasks and perplexity (the LM alone), plus the vision tasks."""
    from engine.evaluate.scoring import Evaluator
    from engine.evaluate.vision_scoring import score_vision

    scores = Evaluator(model, tokenizer, None, n_eval, n_eval).evaluate()
    scores["tasks"].update(score_vision(model, streams_of(model, view), None, n_eval)["tasks"])
    return scores


def member_files(view: ImageView) -> dict[str, bytes]:
    import json

    return {VIEW_FILE: json.dumps(view.to_dict(), indent=2).encode()}
