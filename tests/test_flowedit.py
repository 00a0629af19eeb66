"""FlowEdit (inversion-free editing of flow models): the core against an independent loop of the paper's algorithm,
identity edits, both backends on the same weights, the node through ComfyUI's executor, and its errors."""
from __future__ import annotations

import pytest
import torch

import di_testing as T
import flow_testing as F
from test_flow_inversion import build, comfy_conds, comfy_flow, flow_latent, run_with_ticks


class Analytic:
    """A velocity field with closed form, different per branch: v = A_b z + c_b sigma (a Denoiser)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.a = {b: 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64) for b in ("source", "target")}
        self.c = {b: torch.randn(1, 4, 1, 1, generator=g, dtype=torch.float64) for b in ("source", "target")}
        self.calls = []

    def __call__(self, z, sigma, branch, level, guided=True):
        self.calls.append((branch, level, float(sigma)))
        return torch.einsum("ij,bjhw->bihw", self.a[branch], z) + self.c[branch] * sigma


def reference_flow_edit(v, x_src, levels, n_max, n_min, n_avg, seed):
    """FlowEdit as the paper's Algorithm 1 / the reference's FlowEditSD3 loop, written independently (descending
    ``levels`` ending at 0)."""
    g = torch.Generator().manual_seed(seed)
    steps = len(levels) - 1
    zt_edit, xt_tar = x_src.clone(), None
    for i in range(steps):
        if steps - i > n_max:
            continue
        t_i, t_im1 = levels[i], levels[i + 1]
        if steps - i > n_min:
            v_delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                fwd_noise = torch.randn(x_src.shape, generator=g, dtype=torch.float32).to(x_src)
                zt_src = (1 - t_i) * x_src + t_i * fwd_noise
                zt_tar = zt_edit + zt_src - x_src
                v_delta += (v(zt_tar, t_i, "target") - v(zt_src, t_i, "source")) / n_avg
            zt_edit = zt_edit + (t_im1 - t_i) * v_delta
        else:
            if i == steps - n_min:
                fwd_noise = torch.randn(x_src.shape, generator=g, dtype=torch.float32).to(x_src)
                xt_src = t_i * fwd_noise + (1 - t_i) * x_src
                xt_tar = zt_edit + xt_src - x_src
            xt_tar = xt_tar + (t_im1 - t_i) * v(xt_tar, t_i, "target")
    return zt_edit if n_min == 0 else xt_tar


@pytest.mark.parametrize("n_max,n_min,n_avg", [(10, 0, 1), (7, 0, 3), (8, 3, 2), (10, 10, 1)])
def test_core_follows_the_papers_loop(core, n_max, n_min, n_avg):
    model = Analytic()
    x_src = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(0.1, 1.0, 10, dtype=torch.float64)])
    options = core.FlowEditOptions(n_max=n_max, n_min=n_min, n_avg=n_avg, seed=5)
    ours = core.flow_edit(model, x_src, sigmas, options)
    levels = [float(s) for s in sigmas.flip(0)]
    ours_calls = len(model.calls)
    expected = reference_flow_edit(lambda z, t, b: model(z, t, b, 0), x_src, levels, n_max, n_min, n_avg, seed=5)
    assert torch.allclose(ours, expected, atol=1e-12)
    assert ours_calls == (n_max - n_min) * 2 * n_avg + n_min  # both predictions per draw; the target alone after
    assert not torch.equal(ours, x_src)


def test_identity_edit_is_exact_and_options_are_checked(core):
    model = Analytic()
    model.a["target"], model.c["target"] = model.a["source"], model.c["source"]
    x_src = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(0.05, 1.0, 12, dtype=torch.float64)])
    same = core.flow_edit(model, x_src, sigmas, core.FlowEditOptions(n_max=12, n_avg=2))
    assert (same - x_src).abs().max().item() < 1e-13  # (z_edit + z_src - x_src is z_src to rounding)
    with pytest.raises(ValueError, match="n_min <= n_max"):
        core.FlowEditOptions(n_max=3, n_min=4)
    with pytest.raises(ValueError, match="n_avg must be at least 1"):
        core.FlowEditOptions(n_avg=0)
    with pytest.raises(ValueError, match=r"n_max must be in \[1, 12\]"):
        core.flow_edit(model, x_src, sigmas, core.FlowEditOptions(n_max=13))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_diffusers_flow_edit(diffusers_backend, kind):
    s, d = build(kind), diffusers_backend
    guidance = dict(source_cfg=3.5, target_cfg=13.5) if kind == "sd3" else dict(source_guidance=1.5,
                                                                                target_guidance=5.5)
    negative = s["null"] if kind == "sd3" else None
    run = lambda seed, target: d.flow_edit(s["model"], s["scheduler"], s["z0"], s["source"], target, negative,  # noqa: E731
                                          steps=8, options={"n_max": 6, "seed": seed}, **guidance)
    edited = run(0, s["target"])
    assert edited.shape == s["z0"].shape and (edited - s["z0"]).abs().max() > 1e-3
    assert torch.equal(run(0, s["target"]), edited)  # seeded
    assert not torch.equal(run(1, s["target"]), edited)
    if kind == "flux":  # same prompt, same embedded guidance: the velocities cancel
        same = d.flow_edit(s["model"], s["scheduler"], s["z0"], s["source"], s["source"], steps=8,
                           options={"n_max": 6}, source_guidance=2.0, target_guidance=2.0)
        assert (same - s["z0"]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="FlowEdit edits flow-matching models"):
        d.flow_edit(T.tiny_diffusers_unet(), T.sd_scheduler(), torch.zeros(1, 4, 8, 8), s["source"], s["target"])


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_backends_agree(comfy_backend, diffusers_backend, kind):
    s = build(kind)
    model = comfy_flow(kind, s["model"])
    if kind == "sd3":
        conds, cfgs, guidance = comfy_conds(s), (3.5, 13.5), {}
        source, target = conds["source"], conds["target"]
    else:
        conds, cfgs, guidance = comfy_conds(s), (1.0, 1.0), dict(source_guidance=1.5, target_guidance=5.5)
        source = F.comfy_flow_conditioning(*s["source"], guidance=1.5)
        target = F.comfy_flow_conditioning(*s["target"], guidance=5.5)
    options = {"n_max": 6, "n_min": 1, "n_avg": 2, "seed": 3}
    with torch.inference_mode():
        latent = model.model.process_latent_out(s["z0"])
        ours = comfy_backend.flow_edit(model, latent, source, target, conds["null"], steps=8, source_cfg=cfgs[0],
                                       target_cfg=cfgs[1], options=options)
    theirs = diffusers_backend.flow_edit(s["model"], s["scheduler"], s["z0"], s["source"], s["target"], s["null"],
                                         steps=8, source_cfg=cfgs[0], target_cfg=cfgs[1], options=options, **guidance)
    edited = model.model.process_latent_in(ours)
    assert ((edited - theirs).norm() / theirs.norm()).item() < 1e-4
    assert (edited - s["z0"]).abs().max() > 1e-3


def test_node_in_the_executor(comfy_env, every_progress_tick):
    from test_comfyui_executor import output_of, run_prompt

    graph = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "di_test.png"}},
        "2": {"class_type": "DITest_TinySD3Checkpoint", "inputs": {}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat sitting on a bench", "clip": ["2", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog sitting on a bench", "clip": ["2", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 1]}},
        "7": {"class_type": "DirectInversion_FlowEdit",
              "inputs": {"model": ["2", 0], "latent": ["3", 0], "source": ["4", 0], "target": ["5", 0],
                         "negative": ["6", 0], "steps": 6, "n_max": 4, "n_min": 0, "n_avg": 1, "source_cfg": 3.5,
                         "target_cfg": 13.5, "seed": 0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["2", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "di_flowedit"}},
    }
    executor, ticks = run_with_ticks(graph)
    encoded, edited = output_of(executor, "3", 0)["samples"], output_of(executor, "7", 0)["samples"]
    assert edited.shape == encoded.shape and (edited - encoded).abs().max() > 1e-3
    assert [v for v, t in ticks if t == 4] == [1, 2, 3, 4]

    bad = {**graph, "7": {**graph["7"], "inputs": {**graph["7"]["inputs"], "n_max": 9}}}
    executor, _, validation = run_prompt(bad)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert errors and "n_max (9) cannot exceed its steps (6)" in errors[0]["exception_message"]
    unet = {**graph, "2": {"class_type": "DITest_TinyCheckpoint", "inputs": {}},
            "3": {**graph["3"], "inputs": {"pixels": ["1", 0], "vae": ["2", 2]}}}
    executor, _, validation = run_prompt(unet)
    errors = [d for e, d in executor.status_messages if e == "execution_error"]
    assert errors and "FlowEdit edits flow-matching models" in errors[0]["exception_message"]


def test_flow_latent_helper_is_image_like():
    latent = flow_latent()
    assert latent.shape == (1, F.LATENT_CHANNELS, 16, 16) and 0.3 < latent.std() < 3
