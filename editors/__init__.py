"""Editors: plain PyTorch attention/feature control over the core's denoiser (imports neither ComfyUI nor diffusers).

An editor is a frozen description of an edit (e.g. :class:`P2PEditor`); ``editor.start(layers, steps, latent_shape)``
makes its per-run controller (:class:`attention.EditController`) that the adapters call from their attention hooks.
"""
from .attention import AttentionCall, AttentionLayer, EditController, FeatureCall, attend_probs, attention_probs, layer_orders
from .masactrl import MasaCtrlController, MasaCtrlEditor, default_start_layer
from .pnp import PnPController, PnPEditor
from .p2p_zero import P2PZeroController, P2PZeroEditor, edit_direction
from .p2p import P2P_MODES, P2PController, P2PEditor, prompt_to_prompt
from .p2p_alignment import TokenizedPrompt, auto_mode, tokenize_words, word_positions

__all__ = ["P2P_MODES", "AttentionCall", "AttentionLayer", "EditController", "FeatureCall", "MasaCtrlController", "MasaCtrlEditor",
           "P2PController", "P2PEditor", "P2PZeroController", "P2PZeroEditor", "PnPController", "PnPEditor", "default_start_layer",
           "TokenizedPrompt", "attend_probs", "attention_probs", "auto_mode", "edit_direction", "layer_orders", "prompt_to_prompt",
           "tokenize_words", "word_positions"]
