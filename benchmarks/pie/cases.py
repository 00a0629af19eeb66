"""The benchmark's cases: an inversion (with or without Direct Inversion's offsets) and an editor, with the
settings of the benchmark's own runs (cure-lab/PnPInversion, run_editing_*.py).

A case is named ``INVERSION[+EDITOR]``: ``ddim+p2p``, ``directinversion+p2p``, ``null_text+p2p``,
``negative_prompt+p2p``, ``edict`` (EDICT's own coupled sampling, no editor), ``ddim+masactrl``,
``directinversion+masactrl``, ``ddim+pnp``, ``directinversion+pnp``, ``ddim+p2p_zero``,
``directinversion+p2p_zero``; any inversion goes with any editor. The benchmark's spellings
(``null-text-inversion+p2p``, ``negative-prompt-inversion+p2p``, ``edict+direct_forward``,
``directinversion+pix2pix-zero``) are read too.

Settings (the benchmark's runs): 50 steps, cfg 7.5; P2P in refine mode (the runs never pass
``is_replace_controller``, so every image gets AttentionRefine), cross 0.4, self 0.6, local blend on
``blended_word`` and the target word reweighted by 2 (its ``eq_params``); MasaCtrl from step 4 and layer 10 with the
empty source prompt (the run inverts and reconstructs with ""); PnP with feature injection 0.8 and attention 0.5,
its source branch on the empty prompt (unguided) and the target guided against the PnP run's negative prompt
"ugly, blurry, black, low res, unrealistic"; Pix2Pix-Zero (run_editing_pix2pix_zero.py) with cross-attention
guidance 0.1, the target conditioning the source prompt's embedding plus the edit direction built from the benchmark's
own prompts (brackets stripped, one sentence per side: E(target) - E(source)), and the source prompt as the target's
negative prompt (the run's negative prompt is its caption); with Direct Inversion its offsets go to both branches (the
run's ``latent_list`` path: the P2P-Zero editor's own default, ``offsets="auto"``), recorded as "both". Edits saved as
JPEG at PIL's default quality (75), as the runs saved them.

Where Pix2Pix-Zero's run differs from ours: it captions each image with BLIP and inverts and reconstructs with that
caption (also its negative prompt); we have no BLIP captioner and use the benchmark's source prompt in its place. It
encodes the image by sampling the VAE's latent distribution; we take its mean (as for every case). It inverts with
pix2pix-zero's DDIM inversion with noise regularisation (auto-correlation and KL terms on the predicted noise); we
invert with plain DDIM (the case's inversion). See editors/p2p_zero.py for where the editor itself differs from the
reference code (one gradient step on the conditional latent instead of one per CFG half).

Where a blend word is not in its prompt the benchmark's LocalBlend finds no tokens and keeps the source everywhere
(the edit is lost); here the edit runs without local blend and reweight, and the record says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .data import strip_brackets

INVERSIONS = {  # name -> (the pack's inversion method, offsets)
    "ddim": ("ddim", "off"),
    "directinversion": ("ddim", "source"),
    "null_text": ("null_text", "off"),
    "negative_prompt": ("negative_prompt", "off"),
    "edict": ("edict", "off"),
}
INVERSION_ALIASES = {
    "direct_inversion": "directinversion", "direct-inversion": "directinversion", "di": "directinversion",
    "pnp_inversion": "directinversion", "null-text-inversion": "null_text", "null-text": "null_text",
    "nti": "null_text", "nt": "null_text", "negative-prompt-inversion": "negative_prompt",
    "negative-prompt": "negative_prompt", "npi": "negative_prompt", "np": "negative_prompt",
    "ddim_inversion": "ddim",
}
EDITORS = ("p2p", "masactrl", "pnp", "p2p_zero")
EDITOR_ALIASES = {"prompt-to-prompt": "p2p", "prompt_to_prompt": "p2p", "direct_forward": None, "none": None,
                  "plug-and-play": "pnp", "pix2pix-zero": "p2p_zero", "pix2pix_zero": "p2p_zero",
                  "p2p-zero": "p2p_zero"}
# Direct Inversion's offsets for an editor whose benchmark run puts them elsewhere than on the source branch: the
# editors' own ``default_offsets`` (what the adapters' offsets="auto" resolves to), written out so that the run's
# records say what ran. Pix2Pix-Zero's run adds them to both branches (its latent_list path).
EDITOR_OFFSETS = {"p2p_zero": "both"}
DEFAULT_CASES = ("ddim+p2p", "directinversion+p2p")
PNP_NEGATIVE = "ugly, blurry, black, low res, unrealistic"  # run_editing_pnp.py's negative prompt


class CaseError(ValueError):
    """A case name that names no inversion or editor (the message lists the known ones)."""


@dataclass(frozen=True)
class Settings:
    """What a run does to every image; recorded beside its outputs, so that a resumed run cannot mix settings."""

    steps: int = 50
    cfg: float = 7.5
    p2p_mode: str = "refine"  # the benchmark's runs: AttentionRefine for every image
    p2p_cross: float = 0.4
    p2p_self: float = 0.6
    p2p_blend: bool = True
    p2p_reweight: float = 2.0
    masactrl_step: int = 4
    masactrl_layer: Optional[int] = None  # None: layer 10 of SD1.x's 16 (the same place on other UNets)
    pnp_feature: float = 0.8
    pnp_attention: float = 0.5
    pnp_block: int = 4  # the decoder block of feature injection and the first of attention injection (reference 4)
    pnp_negative: str = PNP_NEGATIVE  # the PnP run's negative prompt for the target (its source is unguided)
    p2p_zero_guidance: float = 0.1  # Pix2Pix-Zero's cross-attention guidance step (the run's xa_guidance)
    save_format: str = "jpg"  # "jpg": PIL's JPEG at quality 75, as the benchmark's runs saved; "png": lossless

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Case:
    name: str  # canonical: the output folder's name
    inversion: str  # key of INVERSIONS
    editor: Optional[str]
    settings: Settings = field(default_factory=Settings, compare=False)

    @property
    def method(self) -> str:
        return INVERSIONS[self.inversion][0]

    @property
    def offsets(self) -> str:
        """Direct Inversion's offsets: "off", or where the inversion adds them, the editor's branches ("source"; for
        Pix2Pix-Zero "both")."""
        offsets = INVERSIONS[self.inversion][1]
        return EDITOR_OFFSETS.get(self.editor, offsets) if offsets == "source" else offsets

    def negative_prompt(self, entry) -> str:
        """The edit's negative prompt for ``entry``: PnP's run guides its target against its own, Pix2Pix-Zero's
        against its caption (here the source prompt); the others use the empty one."""
        if self.editor == "pnp":
            return self.settings.pnp_negative
        if self.editor == "p2p_zero":
            return entry.source_prompt
        return ""

    @property
    def empty_source(self) -> bool:
        """MasaCtrl's benchmark run inverts with the empty prompt (its prompts are ["", target])."""
        return self.editor == "masactrl"


def parse_case(text: str, settings: Settings = Settings()) -> Case:
    parts = [p.strip().lower() for p in str(text).split("+")]
    if not parts[0] or len(parts) > 2:
        raise CaseError(f"a case is INVERSION[+EDITOR], e.g. directinversion+p2p; got {text!r}")
    inversion = INVERSION_ALIASES.get(parts[0], parts[0])
    if inversion not in INVERSIONS:
        raise CaseError(f"unknown inversion {parts[0]!r} in case {text!r}; known: {', '.join(INVERSIONS)}")
    editor = None
    if len(parts) == 2:
        editor = EDITOR_ALIASES[parts[1]] if parts[1] in EDITOR_ALIASES else parts[1]
        if editor is not None and editor not in EDITORS:
            raise CaseError(f"unknown editor {parts[1]!r} in case {text!r}; known: {', '.join(EDITORS)} "
                            "(or none)")
    name = inversion if editor is None else f"{inversion}+{editor}"
    return Case(name=name, inversion=inversion, editor=editor, settings=settings)


def direction_sentences(entry) -> tuple[list[str], list[str]]:
    """Pix2Pix-Zero's sentences for the edit direction, as the benchmark's run builds it: its own source and target
    prompts with the brackets stripped, one sentence per side."""
    return [strip_brackets(entry.source_prompt)], [strip_brackets(entry.target_prompt)]


def target_conditioning(case: Case, editors, model, entry, source):
    """The edit's target conditioning: the target prompt's embedding; for Pix2Pix-Zero ``source`` (the source
    prompt's embedding) plus the edit direction E(target sentence) - E(source sentence)."""
    if case.editor == "p2p_zero":
        sources, targets = direction_sentences(entry)
        delta = editors.edit_direction([model.embed([t]) for t in sources], [model.embed([t]) for t in targets])
        return source + delta.to(source)
    return model.embed([entry.target_prompt])


def make_editor(case: Case, editors, model, entry, notes: list):
    """The pack's editor for ``case`` on ``entry`` (``None`` without one). ``model`` gives ``words(text, editors)``
    (the text encoder's tokenisation) and ``embed(texts)``. A blend word missing from its prompt drops local blend
    and reweight for this image, noted in ``notes``."""
    s = case.settings
    if case.editor is None:
        return None
    if case.editor == "p2p":
        source, target = model.words(entry.source_prompt, editors), model.words(entry.target_prompt, editors)
        blend = {}
        if s.p2p_blend and entry.blended_words:
            blend = {"blend_source_words": [entry.blended_words[0]], "blend_target_words": [entry.blended_words[1]],
                     "reweight": [(entry.blended_words[1], s.p2p_reweight)] if s.p2p_reweight != 1.0 else []}
        try:
            return editors.prompt_to_prompt(source, target, mode=s.p2p_mode, cross_replace_steps=s.p2p_cross,
                                            self_replace_steps=s.p2p_self, **blend)
        except ValueError as err:
            if not blend:
                raise
            notes.append(f"local blend and reweight dropped: {err}")
            return editors.prompt_to_prompt(source, target, mode=s.p2p_mode, cross_replace_steps=s.p2p_cross,
                                            self_replace_steps=s.p2p_self)
    if case.editor == "masactrl":
        return editors.MasaCtrlEditor(start_step=s.masactrl_step, start_layer=s.masactrl_layer)
    if case.editor == "pnp":
        return editors.PnPEditor(feature_injection=s.pnp_feature, attention_injection=s.pnp_attention,
                                 feature_block=s.pnp_block, attention_from_block=s.pnp_block,
                                 source_conditioning=model.embed([""]))
    if case.editor == "p2p_zero":
        return editors.P2PZeroEditor(xa_guidance=s.p2p_zero_guidance)
    raise CaseError(case.editor)
