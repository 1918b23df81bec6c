"""Calibration data: the capture is exact, replays reproduce the sampler, the cache is reused and validated."""

from __future__ import annotations

import logging

import pytest
import torch

from deepcompressor.app.diffusion import capture as capture_module
from deepcompressor.app.diffusion.calibrate_blocks import ReplayPlan, SampleSelection, replay_block
from deepcompressor.app.diffusion.capture import (
    CaptureSettings,
    PromptFileError,
    capture_prompt,
    load_or_capture,
    load_prompt_set,
    model_identity,
    weights_fingerprint,
)
from deepcompressor.app.diffusion.fidelity import teacher_forced_logits
from deepcompressor.config import load_config


@pytest.fixture(scope="module")
def tiny():
    from infinity.pipeline import load_pipeline

    pipe = load_pipeline("tiny", device="cpu", seed=0)
    cfg = load_config(["configs/models/infinity-tiny.yaml"], {"pipeline.device": "cpu", "collect.num_prompts": 2})
    return pipe, cfg


def _record_block_inputs(model):
    records = {i: [] for i in range(len(model.blocks()))}
    handles = [block.register_forward_pre_hook(lambda m, args, i=i: records[i].append(args[0].clone()))
               for i, block in enumerate(model.blocks())]
    return records, handles


def test_replaying_each_block_reproduces_the_sampler_bit_for_bit(tiny):
    pipe, cfg = tiny
    model = pipe.transformer
    settings = CaptureSettings.from_config(cfg)
    from infinity.sampler import sample

    p = cfg.pipeline
    batch = pipe.text_encoder.encode(["a red fox in the snow"])
    records, handles = _record_block_inputs(model)
    try:  # an ordinary generation, every block input recorded
        sample(model, batch.kv_compact, batch.lens, [list(s) for s in settings.schedule], cfg=p.cfg, tau=p.tau,
               top_k=p.top_k, top_p=p.top_p, seed=3, h_div_w=p.h_div_w)
    finally:
        for handle in handles:
            handle.remove()
    captured = capture_prompt(model, pipe.text_encoder, "a red fox in the snow", settings, seed=3)
    assert len(captured.xs) == len(settings.schedule) == 7
    plan = ReplayPlan.build([captured], settings, model)
    inputs = [captured.xs]
    for index, block in enumerate(model.blocks()):
        # the captured / replayed inputs of block i are exactly what the sampler fed block i
        assert len(records[index]) == len(inputs[0])
        for scale, (replayed, sampled) in enumerate(zip(inputs[0], records[index])):
            assert torch.equal(replayed, sampled), f"block {index} scale {scale}"
        inputs = replay_block(block, plan, inputs, keep_outputs=True)


def test_num_scales_keeps_a_prefix_and_stops_early(tiny):
    pipe, cfg = tiny
    settings = CaptureSettings.from_config(load_config(["configs/models/infinity-tiny.yaml"],
                                                       {"pipeline.device": "cpu", "collect.num_scales": 3}))
    full = capture_prompt(pipe.transformer, pipe.text_encoder, "a boat", CaptureSettings.from_config(cfg), seed=0)
    short = capture_prompt(pipe.transformer, pipe.text_encoder, "a boat", settings, seed=0)
    assert settings.num_scales == 3 and len(short.xs) == 3
    for a, b in zip(short.xs, full.xs):
        assert torch.equal(a, b)


def test_teacher_forcing_the_full_precision_model_gives_the_sampler_logits(tiny):
    from infinity.sampler import sample

    pipe, cfg = tiny
    model, p = pipe.transformer, cfg.pipeline
    settings = CaptureSettings.from_config(cfg)
    batch = pipe.text_encoder.encode(["two dogs on a beach"])
    result = sample(model, batch.kv_compact, batch.lens, [list(s) for s in settings.schedule], cfg=p.cfg, tau=p.tau,
                    top_k=p.top_k, top_p=p.top_p, seed=5, h_div_w=p.h_div_w, return_logits=True)
    logits = teacher_forced_logits(model, batch.kv_compact, batch.lens, settings.schedule, result.next_inputs,
                                   cfg=p.cfg, h_div_w=p.h_div_w)
    assert len(logits) == len(result.logits)
    for ours, theirs in zip(logits, result.logits):
        assert torch.equal(ours, theirs)


def test_sample_selection_matches_a_brute_force_subsample():
    sizes, rows, prompts = [1, 4, 9, 16], 2, 3
    selection = SampleSelection.build(prompts, sizes, rows, num_samples=7, max_tokens=40, device="cpu")
    all_samples = [(p, s) for p in range(prompts) for s in range(len(sizes))]
    keep = [round(i * (len(all_samples) - 1) / 6) for i in range(7)]
    expected_samples = [all_samples[i] for i in keep]
    assert selection.selected == set(expected_samples)
    # brute force: label every token of the selected samples, pick 40 evenly spaced ones
    labels = [(sample, t) for sample in expected_samples for t in range(rows * sizes[sample[1]])]
    picked = torch.linspace(0, len(labels) - 1, 40).round().long().tolist()
    expected = {}
    for i in picked:
        sample, t = labels[i]
        expected.setdefault(sample, []).append(t)
    got = {k: v.tolist() for k, v in selection.token_index.items() if v.numel()}
    assert got == expected
    assert selection.num_tokens == 40


def test_cache_is_reused_and_damaged_files_are_captured_again(tiny, tmp_path, monkeypatch, caplog):
    pipe, cfg = tiny
    model = pipe.transformer
    settings = CaptureSettings.from_config(load_config(["configs/models/infinity-tiny.yaml"],
                                                       {"pipeline.device": "cpu", "collect.num_scales": 2}))
    prompts = load_prompt_set("qdiff", 0, 2)
    identity = model_identity(cfg.pipeline, model, pipe.text_encoder)
    first, folder = load_or_capture(model, pipe.text_encoder, prompts, settings, identity, tmp_path)
    calls = []
    real_capture = capture_module.capture_prompt

    def counting_capture(*args, **kwargs):
        calls.append(args[2])
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(capture_module, "capture_prompt", counting_capture)
    again, _ = load_or_capture(model, pipe.text_encoder, prompts, settings, identity, tmp_path)
    assert calls == []
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a.xs, b.xs)) and torch.equal(a.ca_kv, b.ca_kv)
    damaged = folder / "prompt_0001.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        third, _ = load_or_capture(model, pipe.text_encoder, prompts, settings, identity, tmp_path)
    assert calls == [prompts[1][1]]
    assert "prompt_0001.pt" in caplog.text
    assert all(torch.equal(x, y) for x, y in zip(third[1].xs, first[1].xs))
    # another model (seed) -> another cache folder
    other = dict(identity, transformer_fingerprint="0" * 64)
    _, other_folder = load_or_capture(model, pipe.text_encoder, prompts[:1], settings, other, tmp_path)
    assert other_folder != folder


def test_fingerprint_ignores_the_dtype_but_not_the_weights():
    from infinity.tiny import build_tiny_transformer

    fp32 = build_tiny_transformer(0, "cpu", torch.float32)
    bf16 = build_tiny_transformer(0, "cpu", torch.bfloat16)
    other = build_tiny_transformer(1, "cpu", torch.float32)
    assert weights_fingerprint(fp32) == weights_fingerprint(bf16)
    assert weights_fingerprint(fp32) != weights_fingerprint(other)


def test_prompt_offsets_and_errors(tmp_path):
    assert load_prompt_set("qdiff", 512, 2)[0][0] == load_prompt_set("qdiff", 0, 514)[512][0]
    with pytest.raises(ValueError, match="holds 1024"):
        load_prompt_set("qdiff", 1023, 2)
    with pytest.raises(PromptFileError, match="collect.prompts"):
        load_prompt_set(str(tmp_path / "nope.yaml"), 0, 1)


def test_load_prompt_set_from_a_yaml_file_and_its_errors(tmp_path):
    custom = tmp_path / "p.yaml"
    custom.write_text("a: first caption\nb: ' second '\n")
    assert load_prompt_set(str(custom), 0, 2) == [("a", "first caption"), ("b", "second")]
    with pytest.raises(ValueError, match="holds 2"):
        load_prompt_set(str(custom), 1, 2)
    (tmp_path / "list.yaml").write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping of id: caption"):
        load_prompt_set(str(tmp_path / "list.yaml"), 0, 1)


# ------------------------------------------------------------------------------------------------ prompt files


def test_prompt_ids_and_captions_are_kept_as_text(tmp_path):
    from deepcompressor.app.diffusion.capture import load_prompt_set

    path = tmp_path / "p.yaml"
    path.write_text("0512: a red fox\n'7': 'null'\nyes: 12\n0x1F: 'quoted: caption'\n", encoding="utf-8")
    assert load_prompt_set(str(path), 0, 4) == [("0512", "a red fox"), ("7", "null"), ("yes", "12"),
                                                ("0x1F", "quoted: caption")]


@pytest.mark.parametrize(("text", "fragment"), [
    ("a: one\nb:\n", "line 2: empty caption for id 'b'"),
    ("a: one\nb: ~\n", "empty caption for id 'b'"),
    ("a: one\nb: '  '\n", "empty caption for id 'b'"),
    ("a: one\nb: two\na: three\n", "line 3: duplicate id 'a' (first on line 1)"),
    ("a: [one, two]\n", "the caption of id 'a' must be text"),
    ("a: one\n  b: : two\n", "invalid YAML"),
    ("- a\n- b\n", "non-empty mapping"),
])
def test_prompt_file_errors_name_the_file_and_id(tmp_path, text, fragment):
    from deepcompressor.app.diffusion.capture import load_prompt_set

    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError) as error:
        load_prompt_set(str(path), 0, 1)
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_ptq_with_too_few_held_out_prompts_stops_before_building_the_model(tmp_path, capsys, monkeypatch):
    import infinity.pipeline

    from deepcompressor.app.diffusion import ptq_infinity

    built = []
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    prompts = tmp_path / "p.yaml"
    prompts.write_text("".join(f"p{i}: caption {i}\n" for i in range(6)), encoding="utf-8")
    code = ptq_infinity.main(["configs/models/infinity-tiny.yaml", "configs/svdquant/int4.yaml", "--collect-prompts",
                              str(prompts), "--collect-num-prompts", "2", "--eval-prompt-offset", "5",
                              "--eval-num-prompts", "4", "--output-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and not built
    assert err.count("\n") == 1 and "eval.prompt_offset" in err and "holds 6" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_non_finite_calibration_activations_are_refused_naming_the_prompt_and_scale():
    from deepcompressor.app.diffusion.capture import CaptureError, check_capture_finite

    text = {"ca_kv": torch.zeros(3, 4), "gss": torch.zeros(1, 1, 6, 4)}
    xs = [torch.zeros(1, 1, 4), torch.zeros(1, 4, 4)]
    check_capture_finite(xs, text, "a fox")
    xs[1][0, 2, 1] = float("nan")
    with pytest.raises(CaptureError, match=r"'a fox': the block inputs of scale 1 have NaN or Inf"):
        check_capture_finite(xs, text, "a fox")
    text["gss"][0, 0, 0, 0] = float("inf")
    with pytest.raises(CaptureError, match=r"text conditioning \(gss\)"):
        check_capture_finite(xs, text, "a fox")


@pytest.mark.parametrize("app,text,message", [
    ("calibrate_cache_quantization", "a: one\na: two\n", "duplicate id 'a'"),
    ("activations_measurements", "a:\n", "empty caption for id 'a'"),
])
def test_apps_with_a_bad_prompt_file_stop_before_building_the_model(app, text, message, tmp_path, capsys,
                                                                    monkeypatch):
    import importlib

    import infinity.pipeline

    module = importlib.import_module(f"deepcompressor.app.diffusion.{app}" if app.startswith("calibrate")
                                     else f"evaluation.{app}")
    built = []
    monkeypatch.setattr(infinity.pipeline, "pipeline_from_config", lambda *a, **k: built.append(1))
    prompts = tmp_path / "p.yaml"
    prompts.write_text(text, encoding="utf-8")
    argv = ["configs/models/infinity-tiny.yaml", "--collect-prompts", str(prompts)]
    if app == "activations_measurements":
        argv += ["--out", str(tmp_path / "diag")]
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not built and message in err and err.count("\n") == 1
    assert not (tmp_path / "diag").exists()


def test_cpu_captures_are_keyed_by_the_thread_count():
    """CPU products sum in a thread-dependent order: a capture made with 2 threads must not serve a 1-thread run
    (that reuse is why the README's tiny numbers once did not reproduce on a fresh machine)."""
    import torch

    from deepcompressor.app.diffusion.capture import CaptureSettings, capture_key_data
    from deepcompressor.config import load_config

    settings = CaptureSettings.from_config(load_config(["configs/models/infinity-tiny.yaml"]))
    prompts = [("0000", "a boat")]
    previous = torch.get_num_threads()
    try:
        keys = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            keys[threads] = capture_key_data({"device_type": "cpu", "arch": "tiny"}, prompts, settings)
        gpu = capture_key_data({"device_type": "cuda", "arch": "tiny"}, prompts, settings)
    finally:
        torch.set_num_threads(previous)
    assert keys[1] != keys[2] and (keys[1]["cpu_threads"], keys[2]["cpu_threads"]) == (1, 2)
    assert "cpu_threads" not in gpu  # GPU captures do not depend on the host's threads
