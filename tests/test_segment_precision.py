"""One answer on every device: fp32 is the default on CUDA as on CPU, autocast is opt-in.

No GPU is needed: the decision is made by ``inference_settings`` (which only parses the
device string), and the one CUDA-only action, holding cuDNN to IEEE float32, is a torch
flag that ``run_net`` sets whatever the device it runs on.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tme_pipeline.config import StarDistSettings, load_config
from tme_pipeline.segment._infer import inference_settings


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_the_configured_default_is_fp32_on_every_device(device):
    settings = load_config().segmentation.stardist
    assert settings.precision == StarDistSettings().precision == "fp32"
    chosen = inference_settings(device, precision=settings.precision)
    assert chosen.autocast_dtype is None
    assert chosen.exact_fp32 == device.startswith("cuda")
    # "auto" (the old default, still accepted) and no precision at all mean the same.
    assert inference_settings(device, precision="auto") == chosen == inference_settings(device)


def test_autocast_is_opt_in():
    assert inference_settings("cuda", precision="fp16").autocast_dtype == "float16"
    assert inference_settings("cuda", precision="bf16").autocast_dtype == "bfloat16"
    assert inference_settings("cpu", precision="bf16").autocast_dtype == "bfloat16"
    with pytest.raises(ValueError, match="fp16 \\(CUDA only\\)"):
        inference_settings("cpu", precision="fp16")
    with pytest.raises(ValueError, match="'fp64'"):
        inference_settings("cpu", precision="fp64")


def test_config_rejects_an_unknown_precision(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("segmentation: {stardist: {precision: tf32}}\n")
    with pytest.raises(ValueError, match="segmentation.stardist.precision"):
        load_config(user)


_RUN_NET = textwrap.dedent("""
    import sys
    import numpy as np, torch
    from tme_pipeline.segment._infer import InferenceSettings, run_net
    from tme_pipeline.segment.net import StarDistConfig, StarDistNet
    from tme_pipeline.segment.weights import StarDistModel, Thresholds

    def conv_precision():
        return torch.backends.cudnn.conv.fp32_precision

    torch.manual_seed(0)
    cfg = StarDistConfig(n_rays=8, unet_n_depth=1, unet_n_filter_base=4, net_conv_after_unet=8, pixel_um=0.5)
    model = StarDistModel(StarDistNet(cfg).eval(), cfg, Thresholds(0.5, 0.4), "0" * 64)
    x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    exact = sys.argv[1] == "exact"
    before = conv_precision()
    settings = InferenceSettings("cpu", None, False, False, exact_fp32=exact)
    out = [(o, p.numpy(), d.numpy()) for o, p, d in run_net(x, model, settings, None, None)]
    np.save(sys.argv[2], np.concatenate([out[0][1].ravel(), out[0][2].ravel()]))
    print(before, conv_precision())
""")


def test_run_net_holds_cudnn_to_ieee_fp32_and_cpu_results_do_not_change(tmp_path):
    # Fresh processes: the flag is process-wide and must not leak into other tests.
    results = {}
    for mode in ("exact", "default"):
        out = tmp_path / f"{mode}.npy"
        proc = subprocess.run([sys.executable, "-c", _RUN_NET, mode, str(out)], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[mode] = (proc.stdout.split(), np.load(out))
    # torch's own default lets cuDNN use TF32 for float32 convolutions: the reason for the flag.
    assert results["default"][0] == ["tf32", "tf32"]
    assert results["exact"][0] == ["tf32", "ieee"]
    # On CPU the flag changes nothing: the CPU twin of a CUDA fp32 run is bit-identical.
    np.testing.assert_array_equal(results["exact"][1], results["default"][1])


_BY_THREADS = textwrap.dedent("""
    import sys
    import numpy as np, torch
    sys.path.insert(0, sys.argv[3])
    from blobs import make_nuclei
    from tme_pipeline.segment.predict import predict_prob_dist, segment_nuclei
    from tme_pipeline.segment.registry import model_folder
    from tme_pipeline.segment.weights import load_model

    torch.set_num_threads(int(sys.argv[1]))
    model = load_model(model_folder("stardist_fluo_synth"))
    image, _ = make_nuclei((200, 240), seed=4)
    prob, dist = predict_prob_dist((image - image.min()) / np.ptp(image), model=model, device="cpu")
    labels = segment_nuclei(image, 0.5, model=model, device="cpu")
    np.savez(sys.argv[2], prob=prob, dist=dist, labels=labels)
""")


def test_one_or_two_threads_give_the_same_bits(tmp_path):
    # A worker's thread count must not change the nuclei (fp32, the shipped model): with the
    # tiling's invariance, 1 and N workers give the same cells.
    out = {}
    for n in (1, 2):
        path = tmp_path / f"threads{n}.npz"
        proc = subprocess.run([sys.executable, "-c", _BY_THREADS, str(n), str(path), str(Path(__file__).parent)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out[n] = np.load(path)
    assert out[1]["labels"].max() > 10
    for key in ("prob", "dist", "labels"):
        np.testing.assert_array_equal(out[1][key], out[2][key], err_msg=key)
