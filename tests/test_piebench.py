"""PIE-Bench: the data format (loader, run-length masks, brackets, filters), the cases, the runner (resume, shards,
settings), a diffusers model folder written here, and the toy benchmark end to end (run, evaluate, reports)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # appended: the repository's nodes/ package must not shadow ComfyUI's nodes module
    sys.path.append(str(ROOT))

from benchmarks import piebench  # noqa: E402
from benchmarks.pie import cases as pie_cases  # noqa: E402
from benchmarks.pie import data as pie  # noqa: E402
from benchmarks.pie import report, run as pie_run  # noqa: E402


def reference_decode(encoded, shape=(512, 512)):
    """The benchmark's decoding written out as its evaluation does it (element by element)."""
    length = shape[0] * shape[1]
    flat = [0.0] * length
    for i in range(0, len(encoded), 2):
        for j in range(min(encoded[i + 1], length - encoded[i])):
            flat[encoded[i] + j] = 1.0
    mask = np.array(flat).reshape(shape)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1.0
    return mask


def write_small_set(root: Path) -> dict:
    """Three images in the benchmark's exact layout: folders per editing type, jpg files, 12-digit ids, RLE masks
    with known pixels (a rectangle; a run past the end of the image; an empty mask), brackets, every field."""
    from PIL import Image

    rect = np.zeros((512, 512))
    rect[100:150, 200:260] = 1.0
    items = {
        "000000000000": {"image_path": "0_random_140/000000000000.jpg",
                         "original_prompt": "a slanted mountain bicycle on the road",
                         "editing_prompt": "a slanted [rusty] mountain bicycle on the road",
                         "editing_instruction": "Make the frame of the bike rusty", "editing_type_id": "0",
                         "blended_word": "bicycle bicycle", "mask": pie.mask_encode(rect)},
        "111000000000": {"image_path": "1_change_object_80/1_artificial/1_animal/111000000000.jpg",
                         "original_prompt": "a [dog] sitting on a wooden chair",
                         "editing_prompt": "a [cat] sitting on a wooden chair",
                         "editing_instruction": "Change the dog to a cat", "editing_type_id": "1",
                         "blended_word": "dog cat", "mask": [512 * 510 + 500, 1000]},  # runs past the end
        "911000000000": {"image_path": "9_change_style_80/1_artificial/1_animal/911000000000.jpg",
                         "original_prompt": "[painting of] a bird on a branch",
                         "editing_prompt": "[a real photo of] a bird on a branch",
                         "editing_instruction": "Make it a photo", "editing_type_id": "9",
                         "blended_word": "", "mask": []},
    }
    rng = np.random.default_rng(0)
    images = {v["image_path"]: Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
              for v in items.values()}
    pie.write(root, items, images)
    return {"rect": rect, "items": items}


def test_masks_decode_to_the_known_pixels_border_included(tmp_path):
    known = write_small_set(tmp_path)
    entries = {e.key: e for e in pie.load(tmp_path)}
    rect_mask = entries["000000000000"].mask()
    expected = known["rect"].copy()
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = 1.0
    assert np.array_equal(rect_mask, expected)
    assert rect_mask[100:150, 200:260].all() and rect_mask[1:-1, 1:-1].sum() == 50 * 60
    tail = entries["111000000000"].mask()  # a run clipped at the image's end: row 510 from column 500, row 511
    assert np.array_equal(tail, reference_decode(known["items"]["111000000000"]["mask"]))
    assert tail[511].all() and tail[510, 500:].all() and not tail[510, 1:500].any() and tail[1:-1, 1:-1].sum() == 11
    empty = entries["911000000000"].mask()
    assert empty.sum() == 4 * 511 and empty[1:-1, 1:-1].sum() == 0  # the border alone


def test_decode_agrees_with_the_evaluation_loop_on_random_runs():
    rng = np.random.default_rng(3)
    for _ in range(5):
        starts = np.sort(rng.choice(64 * 64, size=8, replace=False))
        encoded = [int(v) for s in starts for v in (s, int(rng.integers(1, 300)))]
        assert np.array_equal(pie.mask_decode(encoded, (64, 64)), reference_decode(encoded, (64, 64)))
    with pytest.raises(pie.DataError, match="pairs"):
        pie.mask_decode([1, 2, 3])


def test_loader_strips_brackets_and_filters(tmp_path):
    write_small_set(tmp_path)
    entries = pie.load(tmp_path)
    assert [e.key for e in entries] == ["000000000000", "111000000000", "911000000000"]
    first = entries[0]
    assert first.source_prompt == "a slanted mountain bicycle on the road"
    assert first.target_prompt == "a slanted rusty mountain bicycle on the road"
    assert entries[2].source_prompt == "painting of a bird on a branch"
    assert first.blended_words == ("bicycle", "bicycle") and entries[2].blended_words == ()
    items = json.loads((tmp_path / "mapping_file.json").read_text())
    items["000000000000"]["blended_word"] = "bicycle rusty frame"  # the scripts take the first two words
    items["111000000000"]["blended_word"] = "dog"  # one word: both prompts
    (tmp_path / "mapping_file.json").write_text(json.dumps(items))
    reread = {e.key: e for e in pie.load(tmp_path)}
    assert reread["000000000000"].blended_words == ("bicycle", "rusty")
    assert reread["111000000000"].blended_words == ("dog", "dog")
    assert first.instruction == "Make the frame of the bike rusty" and entries[1].type_id == "1"
    assert [e.key for e in pie.load(tmp_path, types=["1", "9"])] == ["111000000000", "911000000000"]
    assert [e.key for e in pie.load(tmp_path, limit=2)] == ["000000000000", "111000000000"]
    shards = [[e.key for e in pie.load(tmp_path, shard=(k, 2))] for k in range(2)]
    assert sorted(shards[0] + shards[1]) == [e.key for e in entries] and not set(shards[0]) & set(shards[1])
    assert pie.parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(pie.DataError):
            pie.parse_shard(bad)
    with pytest.raises(pie.DataError, match="editing types"):
        pie.load(tmp_path, types=["12"])


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(pie.DataError, match="mapping_file.json"):
        pie.load(tmp_path)
    known = write_small_set(tmp_path)
    items = dict(known["items"])
    broken = dict(items["000000000000"])
    del broken["mask"]
    (tmp_path / "mapping_file.json").write_text(json.dumps({"000000000000": broken}))
    with pytest.raises(pie.DataError, match="lacks mask"):
        pie.load(tmp_path)
    (tmp_path / "mapping_file.json").write_text(json.dumps(items))
    (tmp_path / "annotation_images" / items["000000000000"]["image_path"]).unlink()
    with pytest.raises(pie.DataError, match="not under"):
        pie.load(tmp_path)


def test_case_names():
    parse = pie_cases.parse_case
    assert (parse("directinversion+p2p").method, parse("directinversion+p2p").offsets) == ("ddim", "source")
    assert parse("ddim+p2p").offsets == "off" and parse("ddim+p2p").editor == "p2p"
    assert parse("null-text-inversion+p2p").name == "null_text+p2p"
    assert parse("negative-prompt-inversion+p2p").method == "negative_prompt"
    assert parse("edict").editor is None and parse("edict+direct_forward").name == "edict"
    assert parse("directinversion+masactrl").empty_source and not parse("ddim+pnp").empty_source
    for name in ("directinversion+p2p_zero", "directinversion+pix2pix-zero", "di+pix2pix_zero", "DDIM+P2P-Zero",
                 "pnp_inversion+p2p-zero"):
        case = parse(name)
        assert case.editor == "p2p_zero" and case.method == "ddim" and case.name.endswith("+p2p_zero"), name
    # Direct Inversion with P2P-Zero: offsets on both branches (the reference's latent_list path); no inversion
    # that runs without offsets gets them
    assert parse("directinversion+pix2pix-zero").name == "directinversion+p2p_zero"
    assert parse("directinversion+p2p_zero").offsets == "both" and parse("ddim+p2p_zero").offsets == "off"
    assert parse("null_text+p2p_zero").offsets == "off" and parse("edict+p2p_zero").offsets == "off"
    assert parse("directinversion+pnp").offsets == "source" and parse("directinversion").offsets == "source"
    for bad in ("stylediffusion+p2p", "ddim+pix2pix", "", "ddim+p2p+pnp", "ddim+p2p_zero+p2p"):
        with pytest.raises(pie_cases.CaseError):
            parse(bad)


def test_editors_follow_the_benchmark_runs(toy_data):
    """P2P: refine for every image (the runs never ask for replace), blend on blended_word, the target word
    reweighted by 2; a blend word missing from its prompt drops blend and reweight with a note."""
    _, editors = piebench._pack()
    from benchmarks.pie import models

    model = models.load_model("toy")
    entry = next(e for e in pie.load(toy_data) if e.type_id == "6")  # same word count: auto would say replace
    notes = []
    editor = pie_cases.make_editor(pie_cases.parse_case("directinversion+p2p"), editors, model, entry, notes)
    assert editor.mode == "refine" and editors.auto_mode(editor.source, editor.target) == "replace"
    assert (editor.cross_replace_steps, editor.self_replace_steps) == (0.4, 0.6)
    assert editor.blend_source_words == (entry.blended_words[0],) and editor.reweight == ((entry.blended_words[1], 2.0),)
    assert notes == []
    import dataclasses

    odd = dataclasses.replace(entry, blended_words=("dog", "cat"))
    editor = pie_cases.make_editor(pie_cases.parse_case("ddim+p2p"), editors, model, odd, notes)
    assert editor.blend_source_words == () and editor.reweight == () and "dropped" in notes[0]
    masactrl = pie_cases.make_editor(pie_cases.parse_case("ddim+masactrl"), editors, model, entry, [])
    assert masactrl.start_step == 4 and masactrl.start_layer is None
    pnp = pie_cases.make_editor(pie_cases.parse_case("ddim+pnp"), editors, model, entry, [])
    assert (pnp.feature_injection, pnp.attention_injection, pnp.feature_block) == (0.8, 0.5, 4)
    assert torch.equal(pnp.source_conditioning, model.embed([""]))
    assert pie_cases.parse_case("ddim+pnp").negative_prompt(entry) == "ugly, blurry, black, low res, unrealistic"
    assert pie_cases.parse_case("directinversion+p2p").negative_prompt(entry) == ""


def test_p2p_zero_follows_the_benchmark_run(toy_data):
    """P2P-Zero: xa_guidance 0.1; the target is the source prompt's embedding plus E(target) - E(source) of the
    benchmark's prompts with the brackets stripped (one sentence per side), its negative the source prompt (the
    reference's caption); with Direct Inversion the offsets are the editor's own default (both branches)."""
    _, editors = piebench._pack()
    from benchmarks.pie import models

    model = models.load_model("toy")
    entry = pie.load(toy_data)[0]
    case = pie_cases.parse_case("directinversion+pix2pix-zero")
    editor = pie_cases.make_editor(case, editors, model, entry, [])
    assert isinstance(editor, editors.P2PZeroEditor) and editor.xa_guidance == 0.1
    assert case.offsets == editors.P2PZeroEditor.default_offsets == "both"  # what the adapters' "auto" gives
    assert pie_cases.make_editor(pie_cases.parse_case("ddim+p2p_zero", pie_cases.Settings(p2p_zero_guidance=0.3)),
                                 editors, model, entry, []).xa_guidance == 0.3
    assert case.negative_prompt(entry) == entry.source_prompt and not case.empty_source
    import dataclasses

    items = json.loads((toy_data / "mapping_file.json").read_text())
    raw = items[entry.key]
    assert "[" in raw["original_prompt"] and "[" in raw["editing_prompt"]
    # the loader strips the brackets; an entry that still had them gets them stripped for the direction too
    marked = dataclasses.replace(entry, source_prompt=raw["original_prompt"], target_prompt=raw["editing_prompt"])
    stripped = ([pie.strip_brackets(raw["original_prompt"])], [pie.strip_brackets(raw["editing_prompt"])])
    assert pie_cases.direction_sentences(marked) == pie_cases.direction_sentences(entry) == stripped
    assert stripped == ([entry.source_prompt], [entry.target_prompt])
    embed = {text: model.embed([text]) for text in (entry.source_prompt, entry.target_prompt, "")}
    source = embed[entry.source_prompt]
    target = pie_cases.target_conditioning(case, editors, model, entry, source)
    expected = source + (embed[entry.target_prompt] - embed[entry.source_prompt])
    torch.testing.assert_close(target, expected, rtol=0, atol=1e-6)
    # the direction is added to the conditioning it is given (the source prompt's, in the run)
    other = pie_cases.target_conditioning(case, editors, model, entry, embed[""])
    torch.testing.assert_close(other, embed[""] + (embed[entry.target_prompt] - embed[entry.source_prompt]),
                               rtol=0, atol=1e-6)
    assert torch.equal(pie_cases.target_conditioning(pie_cases.parse_case("ddim+p2p"), editors, model, entry, source),
                       embed[entry.target_prompt])


# ------------------------------------------------------------------------------------------------ runs on models

@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    from benchmarks.pie import toy_bench

    return toy_bench.build(tmp_path_factory.mktemp("toy_pie"), per_type=2)


def test_toy_benchmark_is_in_the_benchmark_format(toy_data):
    entries = pie.load(toy_data)
    assert len(entries) == 6 and {e.type_id for e in entries} == {"6", "1", "8"}
    items = json.loads((toy_data / "mapping_file.json").read_text())
    for entry in entries:
        item = items[entry.key]
        assert "[" in item["original_prompt"] and "[" in item["editing_prompt"]
        assert set(pie.REQUIRED) <= set(item) and len(item["blended_word"].split()) == 2
        source_word, target_word = entry.blended_words
        assert source_word in entry.source_prompt.split() and target_word in entry.target_prompt.split()
        mask = entry.mask()
        assert 0.0 < mask[1:-1, 1:-1].mean() < 1.0
    colour = next(e for e in entries if e.type_id == "6")
    from PIL import Image

    picture = np.asarray(Image.open(colour.image_file).convert("RGB"), dtype=np.float32)
    inside = colour.mask()[1:-1, 1:-1] > 0.5
    body = picture[1:-1, 1:-1][inside]
    assert body.std(axis=0).max() < 40  # the mask covers the flat-coloured object ...
    assert np.abs(body.mean(axis=0) - picture[1:-1, 1:-1][~inside].mean(axis=0)).max() > 30  # ... not the background


def test_run_resumes_and_refuses_other_settings(toy_data, tmp_path):
    pack = piebench._pack()
    from benchmarks.pie import models

    model = models.load_model("toy")
    settings = pie_cases.Settings(steps=3)
    case = pie_cases.parse_case("directinversion+p2p", settings)
    entries = pie.load(toy_data, limit=2)
    counts = pie_run.run(pie_run.DiffusersRunner(pack, model), [case], entries, tmp_path)
    assert counts[case.name] == {"done": 2, "skipped": 0, "failed": 0}
    records = pie_run.read_records(tmp_path / case.name)
    assert set(records) == {e.key for e in entries}
    for record in records.values():
        assert record["unet_evals"] > 0 and record["seconds"] > 0 and record["peak_memory_mb"] > 0
    saved = pie_run.edit_path(tmp_path, case.name, entries[0].image_path)
    from PIL import Image

    with Image.open(saved) as picture:  # saved at the data's resolution, not the model's 64, as the runs saved
        assert picture.size == (512, 512) and picture.format == "JPEG" and saved.suffix == ".jpg"
    assert pie_run.find_edit(tmp_path, case.name, entries[0].image_path) == saved
    run_info = json.loads((tmp_path / case.name / "run.json").read_text())
    assert run_info["p2p_mode"] == "refine" and run_info["resolution"] == 64 and run_info["dtype"] == "float32"
    counts = pie_run.run(pie_run.DiffusersRunner(pack, model), [case], pie.load(toy_data, limit=3), tmp_path)
    assert counts[case.name] == {"done": 1, "skipped": 2, "failed": 0}
    other = pie_cases.parse_case("directinversion+p2p", pie_cases.Settings(steps=4))
    with pytest.raises(pie_run.RunError, match="steps"):
        pie_run.run(pie_run.DiffusersRunner(pack, model), [other], entries, tmp_path)
    # a run.json from before the offsets and P2P-Zero's guidance were recorded still matches, and gets them
    assert run_info["offsets"] == "source" and run_info["p2p_zero_guidance"] == 0.1
    older = {k: v for k, v in run_info.items() if k not in ("offsets", "p2p_zero_guidance")}
    (tmp_path / case.name / "run.json").write_text(json.dumps(older))
    counts = pie_run.run(pie_run.DiffusersRunner(pack, model), [case], pie.load(toy_data, limit=3), tmp_path)
    assert counts[case.name] == {"done": 0, "skipped": 3, "failed": 0}
    assert json.loads((tmp_path / case.name / "run.json").read_text()) == run_info
    (tmp_path / case.name / "run.json").write_text(json.dumps({**older, "offsets": "both"}))
    with pytest.raises(pie_run.RunError, match="offsets"):
        pie_run.run(pie_run.DiffusersRunner(pack, model), [case], entries, tmp_path)


def test_p2p_zero_cases_run_with_the_reference_conditioning(toy_data, tmp_path):
    """ddim+p2p_zero and directinversion+p2p_zero through the diffusers runner: edits saved, and each edit is given
    the inversion on the source prompt, the target source + (E(target) - E(source)), the source prompt as negative,
    a P2PZeroEditor and the case's offsets ("both" with Direct Inversion), as run.json and the records say."""
    di, editors = piebench._pack()
    from benchmarks.pie import models

    model = models.load_model("toy")
    calls = []

    class Recording:  # the pack's diffusers backend, keeping what each edit is given
        invert = staticmethod(di.invert)

        @staticmethod
        def edit(unet, scheduler, inversion, target, negative, **options):
            calls.append({"target": target, "negative": negative, "source": inversion.conditioning, **options})
            return di.edit(unet, scheduler, inversion, target, negative, **options)

    cases = [pie_cases.parse_case(name, pie_cases.Settings(steps=3)) for name in ("ddim+p2p_zero",
                                                                                   "directinversion+pix2pix-zero")]
    entries = pie.load(toy_data, limit=1)
    counts = pie_run.run(pie_run.DiffusersRunner((Recording, editors), model), cases, entries, tmp_path)
    assert counts == {c: {"done": 1, "skipped": 0, "failed": 0} for c in ("ddim+p2p_zero", "directinversion+p2p_zero")}
    entry = entries[0]
    source, target = model.embed([entry.source_prompt]), model.embed([entry.target_prompt])
    from PIL import Image

    assert len(calls) == 2
    for case, call, offsets in zip(cases, calls, ("off", "both")):
        torch.testing.assert_close(call["target"], source + (target - source), rtol=0, atol=1e-6)
        assert torch.equal(call["negative"], source) and torch.equal(call["source"], source)
        assert isinstance(call["editor"], editors.P2PZeroEditor) and call["editor"].xa_guidance == 0.1
        assert call["offsets"] == offsets and call["cfg"] == 7.5
        with Image.open(pie_run.edit_path(tmp_path, case.name, entry.image_path)) as picture:
            assert picture.size == (512, 512)
        run_info = json.loads((tmp_path / case.name / "run.json").read_text())
        assert run_info["offsets"] == offsets and run_info["p2p_zero_guidance"] == 0.1 and run_info["steps"] == 3
        record = pie_run.read_records(tmp_path / case.name)[entry.key]
        assert "error" not in record and record["offsets"] == offsets and record["unet_evals"] > 0, record


def test_comfyui_graph_of_a_p2p_zero_case(toy_data):
    """The ComfyUI runner's graph for P2P-Zero: the P2P-Zero Editor node on the benchmark's prompts (one sentence per
    side); its source conditioning (1) to Invert's source and the sampler's negative, its target (2) to the sampler's
    target, the editor (0) to the sampler's editor; offsets "both" with Direct Inversion, "off" without."""
    from benchmarks.pie import comfy

    runner = object.__new__(comfy.ComfyRunner)  # the graph alone: no ComfyUI needed
    runner.checkpoint, runner.loader, runner.resolution = "sd15.safetensors", "CheckpointLoaderSimple", 512
    entry = pie.load(toy_data)[0]
    for name, offsets in (("directinversion+p2p_zero", "both"), ("ddim+pix2pix_zero", "off")):
        graph = runner.prompt(pie_cases.parse_case(name, pie_cases.Settings(steps=7)), entry, "piebench/x.png")
        nodes = {}
        for node_id, node in graph.items():
            nodes.setdefault(node["class_type"], []).append((node_id, node["inputs"]))
        (ckpt, _), = nodes["CheckpointLoaderSimple"]
        (editor, inputs), = nodes["DirectInversion_P2PZeroEditor"]
        assert inputs == {"clip": [ckpt, 1], "source_prompt": entry.source_prompt,
                          "target_prompt": entry.target_prompt, "xa_guidance": 0.1,
                          "source_sentences": entry.source_prompt, "target_sentences": entry.target_prompt}
        (_, invert), = nodes["DirectInversion_Invert"]
        assert invert["source"] == [editor, 1] and invert["method"] == "ddim" and invert["steps"] == 7
        (_, sampler), = nodes["DirectInversion_Sampler"]
        assert sampler["target"] == [editor, 2] and sampler["negative"] == [editor, 1]
        assert sampler["editor"] == [editor, 0] and sampler["offsets"] == offsets and sampler["cfg"] == 7.5
        # the one text encode left is the empty prompt of Invert's negative: the prompts go through the editor
        assert [n["text"] for _, n in nodes["CLIPTextEncode"]] == [""]
        assert invert["negative"] == [nodes["CLIPTextEncode"][0][0], 0]


def test_run_records_a_failing_image_and_goes_on(toy_data, tmp_path, monkeypatch):
    pack = piebench._pack()
    from benchmarks.pie import models

    model = models.load_model("toy")
    entries = pie.load(toy_data, limit=2)
    real = pie_run.edit_entry

    def flaky(pack_, model_, case_, entry, counter):
        if entry.key == entries[0].key:
            raise RuntimeError("out of memory (simulated)")
        return real(pack_, model_, case_, entry, counter)

    monkeypatch.setattr(pie_run, "edit_entry", flaky)
    case = pie_cases.parse_case("ddim", pie_cases.Settings(steps=2))
    counts = pie_run.run(pie_run.DiffusersRunner(pack, model), [case], entries, tmp_path, log=lambda *_: None)
    assert counts[case.name] == {"done": 1, "skipped": 0, "failed": 1}
    records = pie_run.read_records(tmp_path / case.name)
    assert "simulated" in records[entries[0].key]["error"] and "error" not in records[entries[1].key]
    assert pie_run.find_edit(tmp_path, case.name, entries[0].image_path) is None
    # a later run (another shard file) edits the failed image: its success is the record that counts
    monkeypatch.setattr(pie_run, "edit_entry", real)
    pie_run.run(pie_run.DiffusersRunner(pack, model), [case], entries, tmp_path, shard=(0, 1))
    assert sorted(p.name for p in (tmp_path / case.name / "records").iterdir()) == ["0of1.jsonl", "all.jsonl"]
    assert "error" not in pie_run.read_records(tmp_path / case.name)[entries[0].key]


def _tiny_sd_folder(root: Path) -> Path:
    """A diffusers Stable Diffusion folder with tiny random parts (tests of loading real folders offline)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import di_testing

    di_testing.tiny_diffusers_unet().save_pretrained(root / "unet")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=32).save_pretrained(root / "vae")
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["'", ","]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt"),
                        model_max_length=77)
    tok.save_pretrained(root / "tokenizer")
    unet_dim = json.loads((root / "unet" / "config.json").read_text())["cross_attention_dim"]
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=unet_dim, intermediate_size=2 * unet_dim,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                 bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                                 pad_token_id=vocab["<|endoftext|>"])).save_pretrained(root / "text_encoder")
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False).save_pretrained(root / "scheduler")
    return root


def test_metrics_without_models_are_skipped_with_a_reason(monkeypatch, tmp_path):
    metrics = piebench._metrics()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    lines = []
    scorer = report.Scorer(metrics, log=lines.append)
    assert set(scorer.skipped) == {"structure_distance", "clip_similarity_target_image",
                                   "clip_similarity_target_image_edit_part", "lpips_unedit_part"}
    assert any("lpips_unedit_part skipped" in line and "never downloaded" in line for line in lines)
    assert str(tmp_path) not in scorer.skipped["lpips_unedit_part"]  # the report names no local folder
    image = torch.rand(3, 64, 64)
    mask = torch.zeros(64, 64)
    mask[16:32, 16:32] = 1.0
    edited = (image + 0.1 * torch.rand(3, 64, 64)).clamp(0, 1)
    row = scorer(image, edited, mask, "a prompt")
    outside = (1 - mask).bool()
    expected_mse = ((edited - image)[:, outside] ** 2).sum().item() / image.numel()  # zeros inside count, as there
    assert row["mse_unedit_part"] == pytest.approx(expected_mse, rel=1e-5)
    assert row["psnr_unedit_part"] == pytest.approx(10 * np.log10(1 / expected_mse), rel=1e-5)
    assert all(np.isnan(row[k]) for k in scorer.skipped) and not np.isnan(row["ssim_unedit_part"])


def test_run_through_a_diffusers_folder(toy_data, tmp_path):
    folder = _tiny_sd_folder(tmp_path / "sd")
    out = tmp_path / "out"
    code = piebench.main(["run", "--data", str(toy_data), "--model", str(folder), "--cases", "directinversion+p2p",
                          "ddim+masactrl", "directinversion+p2p_zero", "--out", str(out), "--limit", "1", "--steps",
                          "3", "--device", "cpu"])
    assert code == 0
    entry = pie.load(toy_data, limit=1)[0]
    from PIL import Image

    for case in ("directinversion+p2p", "ddim+masactrl", "directinversion+p2p_zero"):
        assert Image.open(pie_run.edit_path(out, case, entry.image_path)).size == (512, 512)
        run_info = json.loads((out / case / "run.json").read_text())
        assert run_info["model"] == str(folder.resolve()) and run_info["steps"] == 3 and run_info["resolution"] == 16 * 2
        assert pie_run.read_records(out / case)[entry.key]["unet_evals"] > 0
    assert piebench.main(["run", "--data", str(toy_data), "--model", str(tmp_path / "nothing"), "--out",
                          str(out)]) == 2
    assert piebench.main(["run", "--data", str(toy_data), "--model", str(tmp_path), "--out", str(out)]) == 2


def test_toy_benchmark_end_to_end(toy_data, tmp_path, capsys):
    """run (ddim+p2p, directinversion+p2p), then evaluate: the CSV, the table and the plot, and Direct Inversion
    keeps the unedited part better than DDIM (background PSNR), as in the paper's Table 1."""
    out = tmp_path / "out"
    assert piebench.main(["run", "--data", str(toy_data), "--model", "toy", "--cases", "ddim+p2p",
                          "directinversion+p2p", "--out", str(out), "--steps", "20", "--device", "cpu"]) == 0
    import torchvision

    squeezenet = tmp_path / "squeezenet1_1-b8a52dc0.pth"  # random weights in torchvision's layout: LPIPS runs
    torch.save(torchvision.models.squeezenet1_1().state_dict(), squeezenet)
    assert piebench.main(["evaluate", "--data", str(toy_data), "--out", str(out), "--per-type",
                          "--lpips", str(squeezenet)]) == 0
    printed = capsys.readouterr().out
    assert "structure_distance skipped" in printed and "clip_similarity_target_image skipped" in printed
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {r["case"] for r in rows} == {"ddim+p2p", "directinversion+p2p"}
    for row in rows:
        assert float(row["psnr_unedit_part"]) > 10 and 0 < float(row["ssim_unedit_part"]) <= 1
        assert float(row["lpips_unedit_part"]) >= 0 and row["structure_distance"] == "nan"
        assert int(row["unet_evals"]) > 0
    summary = {r["case"]: r for r in json.loads((out / "summary.json").read_text())["summary"]}
    assert summary["directinversion+p2p"]["psnr_unedit_part"] > summary["ddim+p2p"]["psnr_unedit_part"]
    table = (out / "summary.md").read_text()
    assert "| ddim+p2p | 6 |" in table and "*paper: directinversion+p2p*" in table and "27.22" in table
    assert "| Structure distance ×10³ ↓ | PSNR ↑ | LPIPS ×10³ ↓ | MSE ×10⁴ ↓ | SSIM ×10² ↑ |" in table
    assert "## Editing type 8: change background" in table
    from PIL import Image

    assert Image.open(out / "summary.png").size[0] > 200


def test_run_through_comfyui_headless(comfy_env, comfyui_path, toy_data, tmp_path):
    """`run --comfyui`: the same cases as graphs of the pack's nodes, run by ComfyUI's executor (a tiny SD1.5
    stand-in for the checkpoint loader); the edits land where `evaluate` reads them, at the data's resolution."""
    out = tmp_path / "out"
    argv = ["run", "--data", str(toy_data), "--comfyui", "tiny.safetensors", "--comfyui-path", str(comfyui_path),
            "--comfyui-loader", "DITest_TinyCheckpoint", "--resolution", "128", "--cases", "directinversion+p2p",
            "ddim+masactrl", "directinversion+pnp", "edict", "directinversion+pix2pix-zero", "--out", str(out),
            "--limit", "1", "--steps", "3", "--pnp-block", "3", "--device", "cpu"]
    assert piebench.main(argv) == 0
    entry = pie.load(toy_data, limit=1)[0]
    from PIL import Image

    for case in ("directinversion+p2p", "ddim+masactrl", "directinversion+pnp", "edict", "directinversion+p2p_zero"):
        assert Image.open(pie_run.edit_path(out, case, entry.image_path)).size == (512, 512)
        record = pie_run.read_records(out / case)[entry.key]
        assert "error" not in record and record["unet_evals"] > 0, record
        run_info = json.loads((out / case / "run.json").read_text())
        assert run_info["model"] == "comfyui:tiny.safetensors"
        assert record["offsets"] == run_info["offsets"] == pie_cases.parse_case(case).offsets
    assert pie_run.read_records(out / "directinversion+p2p_zero")[entry.key]["offsets"] == "both"
    # the graph does the work of the diffusers path: as many UNet evaluations per case (the toy model there)
    toy_out = tmp_path / "toy"
    assert piebench.main(["run", "--data", str(toy_data), "--model", "toy", "--cases", "directinversion+p2p", "edict",
                          "directinversion+p2p_zero", "--out", str(toy_out), "--limit", "1", "--steps", "3",
                          "--device", "cpu"]) == 0
    for case in ("directinversion+p2p", "edict", "directinversion+p2p_zero"):
        assert (pie_run.read_records(out / case)[entry.key]["unet_evals"]
                == pie_run.read_records(toy_out / case)[entry.key]["unet_evals"])
    assert piebench.main(argv) == 0  # resumed: nothing left to do
    assert len(pie_run.read_records(out / "edict")) == 1
    assert piebench.main([*argv[:4], "missing.safetensors", *argv[5:7], "--out", str(tmp_path / "o2")]) == 2
