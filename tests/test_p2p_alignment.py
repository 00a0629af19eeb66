"""Prompt-to-Prompt token alignment against hand-written expected alignments (toy word-piece tokenizer)."""
from __future__ import annotations

import pytest
import torch

START, END = 100, 101
VOCAB = {"a": [1], "cat": [2], "dog": [3], "fluffy": [4, 5], "sitting": [6], "on": [7], "bench": [8], "red": [9],
         "motorbike": [10, 11], "the": [12]}


@pytest.fixture(scope="module")
def p2p(pack):
    from comfyui_direct_inversion.editors import p2p_alignment

    return p2p_alignment


def tok(p2p, text):
    return p2p.tokenize_words(text, lambda word: VOCAB[word], START, END)


def test_tokenisation_positions(p2p):
    prompt = tok(p2p, "a fluffy cat")
    assert prompt.ids == (START, 1, 4, 5, 2, END)
    assert prompt.spans == ((1,), (2, 3), (4,))
    assert p2p.word_positions(prompt, "fluffy") == [2, 3]
    assert p2p.word_positions(prompt, "fluffy cat") == [2, 3, 4]
    with pytest.raises(ValueError, match="'dog' is not a word of the prompt 'a fluffy cat'"):
        p2p.word_positions(prompt, "dog")
    with pytest.raises(ValueError, match="has 79 tokens but the text encoder's window is 77"):
        tok(p2p, " ".join(["a"] * 77))


def test_replace_one_word_swap_is_the_identity_map(p2p):
    mapper = p2p.replacement_mapper(tok(p2p, "a cat sitting on a bench"), tok(p2p, "a dog sitting on a bench"))
    assert torch.equal(mapper, torch.eye(77))


def test_replace_with_a_multi_token_word(p2p):
    mapper = p2p.replacement_mapper(tok(p2p, "a cat on a bench"), tok(p2p, "a motorbike on a bench"))
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1.0  # start, "a"
    expected[2, 2] = expected[2, 3] = 0.5  # "cat" spreads over "motor" "bike"
    for s in range(3, 76):  # "on", "a", "bench", end and padding, shifted by one
        expected[s, s + 1] = 1.0
    assert torch.equal(mapper, expected)


def test_replace_needs_equal_word_counts(p2p):
    with pytest.raises(ValueError, match="same number of words.*use refine"):
        p2p.replacement_mapper(tok(p2p, "a cat"), tok(p2p, "a fluffy cat"))


def test_refine_insertion(p2p):
    mapper, alphas = p2p.refinement_mapper(tok(p2p, "a cat"), tok(p2p, "a fluffy cat"))
    assert alphas[:6].tolist() == [1, 1, 0, 0, 1, 1]  # "fluffy" (two tokens) is new
    assert mapper[[0, 1, 4, 5]].tolist() == [0, 1, 2, 3]
    assert mapper[6:9].tolist() == [4, 5, 6] and alphas[6:].eq(1).all()  # padding to padding


def test_refine_deletion(p2p):
    mapper, alphas = p2p.refinement_mapper(tok(p2p, "a red cat"), tok(p2p, "a cat"))
    assert mapper[:4].tolist() == [0, 1, 3, 4] and alphas[:4].eq(1).all()
    assert mapper[4] == 5


def test_refine_changed_words(p2p):
    mapper, alphas = p2p.refinement_mapper(tok(p2p, "a cat on a bench"), tok(p2p, "a fluffy dog on the bench"))
    # target: start a fluffy(2) dog on the bench end
    assert alphas[:9].tolist() == [1, 1, 0, 0, 0, 1, 0, 1, 1]
    assert mapper[[0, 1, 5, 7, 8]].tolist() == [0, 1, 3, 5, 6]


def test_auto_mode_and_equalizer(p2p):
    cat, dog, fluffy = tok(p2p, "a cat"), tok(p2p, "a dog"), tok(p2p, "a fluffy cat")
    assert p2p.auto_mode(cat, dog) == "replace" and p2p.auto_mode(cat, fluffy) == "refine"
    scale = p2p.equalizer(fluffy, ["fluffy"], [2.0])
    assert scale[[2, 3]].tolist() == [2.0, 2.0] and scale.sum().item() == 77 + 2
    with pytest.raises(ValueError, match="one value per word"):
        p2p.equalizer(fluffy, ["fluffy", "cat"], [2.0])
