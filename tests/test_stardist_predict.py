import pickle
import threading
import time
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.transform import resize
from torch.nn import functional as F

from blobs import make_nuclei
from tme_pipeline.segment.metrics import match_labels
from tme_pipeline.segment.net import StarDistConfig, StarDistNet
from tme_pipeline.segment.predict import (
    inference_settings,
    make_tile_segmenter,
    predict_prob_dist,
    segment_nuclei,
    slide_norm,
)
from tme_pipeline.segment.weights import StarDistModel, Thresholds, load_model, save_model

SMALL = StarDistConfig(n_rays=16, unet_n_depth=2, unet_n_filter_base=8, net_conv_after_unet=16, pixel_um=0.5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A randomly initialised small model, saved and reloaded; its prob sits near
    0.5, its rays are ~4 px long (bias), so that it draws objects."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    net = StarDistNet(SMALL)
    torch.nn.init.constant_(net.layers["dist"].bias, 4.0)
    save_model(folder, net, SMALL, Thresholds(prob=0.5, nms=0.4))
    return load_model(folder)


@pytest.fixture(scope="module")
def nuclei():
    return make_nuclei((200, 232), pixel_um=0.5, seed=5)


def _thresh_with_objects(model, image):
    """A probability threshold that a few per cent of grid pixels pass (away from
    the border, where a random net's output is extreme and StarDist ignores it)."""
    lo, hi = slide_norm(image)
    prob, _ = predict_prob_dist((image - lo) / (hi - lo), model=model, device="cpu")
    return float(np.quantile(prob[4:-4, 4:-4], 0.97))


def test_runs_deterministic_and_typed(tiny_model, nuclei):
    image, _ = nuclei
    thr = _thresh_with_objects(tiny_model, image)
    a = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=thr, device="cpu")
    b = segment_nuclei(image, 0.5, model=tiny_model.path, prob_thresh=thr, device="cpu")
    assert a.shape == image.shape and a.dtype == np.int32
    assert a.max() > 0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.unique(a), np.arange(a.max() + 1))


def test_any_input_dtype(tiny_model, nuclei):
    image, _ = nuclei
    thr = _thresh_with_objects(tiny_model, image)
    as_u16 = (image / image.max() * 60000).astype(np.uint16)
    labels = segment_nuclei(as_u16, 0.5, model=tiny_model, prob_thresh=thr, device="cpu")
    assert labels.dtype == np.int32 and labels.max() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_patches_do_not_change_the_result(tiny_model, nuclei, precision, batch_size):
    # batch_size 1: each window takes only the context it needs; 3: windows share one shape
    image, _ = nuclei
    thr = _thresh_with_objects(tiny_model, image)
    whole = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=thr, device="cpu", precision=precision)
    patched = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=thr, device="cpu", precision=precision,
                             tile_px=32, batch_size=batch_size)
    assert match_labels(whole, patched, iou_threshold=0.9).f1 >= 0.99
    if precision == "fp32":
        lo, hi = slide_norm(image)
        x = (image - lo) / (hi - lo)
        prob, dist = predict_prob_dist(x, model=tiny_model, device="cpu")
        prob_p, dist_p = predict_prob_dist(x, model=tiny_model, device="cpu", tile_px=32, batch_size=batch_size)
        np.testing.assert_allclose(prob_p, prob, atol=1e-5)
        np.testing.assert_allclose(dist_p, dist, atol=1e-4)


_REUSE_SCRIPT = """
import resource, sys
import numpy as np
from tme_pipeline.segment.predict import predict_prob_dist
from tme_pipeline.segment.weights import load_model
model = load_model(sys.argv[1])
x = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
for _ in range(2):  # the heap settles into its layout
    predict_prob_dist(x, model=model, device="cpu")
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    predict_prob_dist(x, model=model, device="cpu")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_per_pass(script: str, model_path) -> list[int]:
    """Run a page-fault probe script in a fresh interpreter; its per-pass minor faults, sorted."""
    done = subprocess.run([sys.executable, "-c", script, str(model_path)], capture_output=True, text=True,
                          check=True)
    return sorted(int(n) for n in done.stdout.split())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_repeated_cpu_inference_reuses_host_memory(tiny_model):
    # Unset, glibc maps every block over 32 MB afresh and the kernel faults it in again on
    # each pass: here >= 2 activations of 8 x 2048 x 2048 float32 (128 MB, 32 768 pages).
    # A fresh interpreter, as `tme run` is: what earlier tests left on this process's heap
    # decides where a 128 MB block lands, not the pipeline.
    # Per pass, the median of five: now and then a pass still grows the heap once (a
    # 128 MB block finding no free stretch of its size), which is not the steady state.
    faults = _faults_per_pass(_REUSE_SCRIPT, tiny_model.path)
    assert len(faults) == 5 and faults[2] < 32768 // 4


_THREAD_REUSE_SCRIPT = """
import resource, sys
from concurrent.futures import ThreadPoolExecutor
from tme_pipeline.segment._malloc import share_one_heap
assert share_one_heap()  # first, as `tme segment` does
import numpy as np
from tme_pipeline.segment.predict import predict_prob_dist
from tme_pipeline.segment.weights import load_model
model = load_model(sys.argv[1])
x = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
with ThreadPoolExecutor(2) as pool:  # the passes run in worker threads, as Dask's
    for _ in range(4):  # the heap settles into its layout
        pool.submit(predict_prob_dist, x, model=model, device="cpu").result()
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        pool.submit(predict_prob_dist, x, model=model, device="cpu").result()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_passes_in_worker_threads_reuse_host_memory(tiny_model):
    # A thread of its own gets a glibc arena of its own, whose heaps hold at most 64 MiB:
    # every 128 MB activation was mapped afresh whatever M_MMAP_MAX said (>= 2 activations
    # x 32 768 pages a pass). With one arena the threads reuse the main heap. The median
    # pass of five, as above.
    faults = _faults_per_pass(_THREAD_REUSE_SCRIPT, tiny_model.path)
    assert len(faults) == 5 and faults[2] < 32768 // 4


@pytest.mark.parametrize("image", [np.zeros((64, 80), np.float32), np.full((70, 50), 7, np.uint16),
                                   np.zeros((0, 0), np.float32), np.zeros((1, 300), np.float32)])
def test_empty_and_constant_images_give_no_nuclei(tiny_model, image):
    labels = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=0.0, device="cpu")
    assert labels.shape == image.shape and labels.dtype == np.int32 and labels.max(initial=0) == 0


def test_input_validation(tiny_model):
    with pytest.raises(ValueError, match="2-D"):
        segment_nuclei(np.zeros((2, 8, 8)), 0.5, model=tiny_model)
    with pytest.raises(ValueError, match="pixel_um"):
        segment_nuclei(np.zeros((8, 8)), 0.0, model=tiny_model)


def test_slide_norm():
    assert slide_norm(np.arange(1001.0)) == pytest.approx((10.0, 998.0))
    assert slide_norm(np.arange(101), percentiles=(0, 100)) == (0.0, 100.0)


def test_inference_settings_by_device(monkeypatch):
    cpu = inference_settings("cpu")
    assert (cpu.device, cpu.autocast_dtype, cpu.pin_memory, cpu.non_blocking) == ("cpu", None, False, False)
    assert inference_settings("cpu", precision="auto").autocast_dtype is None
    assert inference_settings("cpu", precision="bf16").autocast_dtype == "bfloat16"
    cuda = inference_settings("cuda:1")
    assert (cuda.device, cuda.autocast_dtype, cuda.pin_memory, cuda.non_blocking) == ("cuda:1", None, True, True)
    assert cuda.exact_fp32 and not cpu.exact_fp32
    assert inference_settings("cuda", precision="fp16").autocast_dtype == "float16"
    assert not inference_settings("cuda", precision="bf16").exact_fp32
    with pytest.raises(ValueError, match="precision"):
        inference_settings("cpu", precision="fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_settings().device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert inference_settings().autocast_dtype is None


def test_bf16_on_cpu_runs_the_same_code_path(tiny_model, nuclei):
    image, _ = nuclei
    lo, hi = slide_norm(image)
    x = (image - lo) / (hi - lo)
    prob32, dist32 = predict_prob_dist(x, model=tiny_model, device="cpu", precision="fp32")
    prob16, dist16 = predict_prob_dist(x, model=tiny_model, device="cpu", precision="bf16")
    assert prob16.dtype == np.float32 and prob16.shape == prob32.shape
    assert 0 < np.abs(prob16 - prob32).max() < 0.02


def test_tile_segmenter_pickles_and_loads_lazily(tiny_model, nuclei):
    image, _ = nuclei
    thr = _thresh_with_objects(tiny_model, image)
    norm = slide_norm(image[::4, ::4])
    seg = make_tile_segmenter(tiny_model, pixel_um=0.5, norm=norm, device="cpu", prob_thresh=thr)
    blob = pickle.dumps(seg)
    assert len(blob) < 2000  # the folder path travels, not the weights
    worker = pickle.loads(blob)
    assert worker._model is None
    labels = worker(image)
    first = worker._model
    np.testing.assert_array_equal(worker(image), labels)
    assert worker._model is first
    expected = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=thr, norm=norm, device="cpu")
    np.testing.assert_array_equal(labels, expected)
    by_path = make_tile_segmenter(tiny_model.path, pixel_um=0.5, norm=norm, device="cpu", prob_thresh=thr)
    np.testing.assert_array_equal(by_path(image), labels)


def test_tile_segmenter_needs_a_folder(tiny_model):
    unsaved = StarDistModel(net=tiny_model.net, config=SMALL, thresholds=tiny_model.thresholds, sha256="")
    with pytest.raises(ValueError, match="no folder"):
        make_tile_segmenter(unsaved, pixel_um=0.5, norm=(0, 1))


class _DiskOracle(torch.nn.Module):
    """A stand-in net whose output we know: prob = mean intensity in a disk of
    radius R around each pixel (peaks at the centre of a disk of radius R),
    every ray of length R. On disks of radius R it finds exactly those disks."""

    def __init__(self, config, radius_px):
        super().__init__()
        self.config, self.radius_px = config, radius_px
        r = int(np.ceil(radius_px))
        yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
        disk = (np.hypot(yy, xx) <= radius_px).astype(np.float32)
        self.register_buffer("kernel", torch.from_numpy(disk / disk.sum())[None, None])

    def forward(self, x):
        gy, gx = self.config.grid
        mean = F.conv2d(x, self.kernel, padding=self.kernel.shape[-1] // 2)[..., ::gy, ::gx]
        dist = torch.full((x.shape[0], self.config.n_rays, *mean.shape[2:]), self.radius_px)
        return mean, dist


def _disks(shape, radius_px, centres):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, 1):
        labels[np.hypot(yy - cy, xx - cx) <= radius_px] = i
    return labels


def test_resampling_renders_objects_on_the_input_grid():
    radius = 6.0  # px at the model's 0.5 µm
    cfg = StarDistConfig(n_rays=32, pixel_um=0.5)
    model = StarDistModel(net=_DiskOracle(cfg, radius), config=cfg, thresholds=Thresholds(0.6, 0.3), sha256="")
    rng = np.random.default_rng(0)
    centres = [(y + rng.uniform(-3, 3), x + rng.uniform(-3, 3)) for y in range(20, 190, 30) for x in range(20, 230, 30)]
    truth = _disks((200, 240), radius, centres)
    image = (truth > 0).astype(np.float32)
    at_05 = segment_nuclei(image, 0.5, model=model, device="cpu")
    assert match_labels(truth, at_05, iou_threshold=0.7).f1 == 1.0

    # The same slide scanned at 0.25 µm: twice the pixels, same objects.
    truth_fine = _disks((400, 480), 2 * radius, [(2 * cy + 0.5, 2 * cx + 0.5) for cy, cx in centres])
    fine = resize(image, (400, 480), order=1)
    at_025 = segment_nuclei(fine, 0.25, model=model, device="cpu")
    assert at_025.shape == fine.shape
    assert match_labels(truth_fine, at_025, iou_threshold=0.7).f1 == 1.0
    assert match_labels(at_05, resize(at_025, at_05.shape, order=0, anti_aliasing=False,
                                      preserve_range=True).astype(np.int32), iou_threshold=0.5).f1 == 1.0
    # Within 5 % of the model's pixel size nothing is resampled.
    np.testing.assert_array_equal(segment_nuclei(image, 0.51, model=model, device="cpu"), at_05)


def test_threads_sharing_a_fresh_model_get_the_sequential_result(tiny_model, nuclei):
    # Dask's threaded scheduler runs tiles concurrently on one model: its first move to
    # channels-last must not happen under another thread's forward pass.
    from concurrent.futures import ThreadPoolExecutor

    from tme_pipeline.segment.weights import load_model

    image, _ = nuclei
    thr = _thresh_with_objects(tiny_model, image)
    expected = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=thr, device="cpu")
    for _ in range(3):
        fresh = load_model(tiny_model.path)
        assert not fresh.net.layers["grid_0_no_1"].weight.is_contiguous(memory_format=torch.channels_last)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: segment_nuclei(image, 0.5, model=fresh, prob_thresh=thr,
                                                             device="cpu"), range(4)))
        for labels in results:
            np.testing.assert_array_equal(labels, expected)


class _CountingNet(torch.nn.Module):
    """Wraps a net; records how many forward passes run at once, and can make each
    pass wait at a barrier so that only concurrently admitted passes get through."""

    def __init__(self, net, barrier=None):
        super().__init__()
        self.net, self.barrier = net, barrier
        self.running = self.most = 0
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=10)
            else:
                time.sleep(0.02)  # widens the window in which a second pass could enter
            return self.net(x)
        finally:
            with self.lock:
                self.running -= 1


@pytest.mark.parametrize("bound", [1, 2])
def test_concurrent_passes_bounds_forward_passes_across_threads(tiny_model, nuclei, bound):
    from concurrent.futures import ThreadPoolExecutor

    image, _ = nuclei
    thr = _thresh_with_objects(tiny_model, image)
    expected = segment_nuclei(image, 0.5, model=tiny_model, prob_thresh=thr, device="cpu")
    # Bound 1: four threads, several patches each, never two passes at once. Bound 2: two
    # threads of one pass each must both be inside their pass to pass the barrier (with
    # one slot it would break), so the second slot is really granted.
    n_threads, tile_px = (4, 64) if bound == 1 else (2, None)
    net = _CountingNet(tiny_model.net, threading.Barrier(2) if bound == 2 else None)
    model = StarDistModel(net=net, config=tiny_model.config, thresholds=tiny_model.thresholds, sha256="")
    with ThreadPoolExecutor(n_threads) as pool:
        results = list(pool.map(lambda _: segment_nuclei(image, 0.5, model=model, prob_thresh=thr, device="cpu",
                                                         tile_px=tile_px, concurrent_passes=bound),
                                range(n_threads)))
    assert net.most == bound
    for labels in results:
        assert match_labels(expected, labels, iou_threshold=0.9).f1 == 1.0
    with pytest.raises(ValueError, match="concurrent passes"):
        segment_nuclei(image, 0.5, model=tiny_model, device="cpu", concurrent_passes=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenMP runtimes found through /proc")
def test_nms_on_one_openmp_thread_keeps_the_same_polygons(tiny_model, nuclei):
    from stardist.nms import non_maximum_suppression_sparse

    from tme_pipeline.segment._infer import inference_settings
    from tme_pipeline.segment.predict import _candidates, _openmp_runtimes, single_threaded_openmp

    image, _ = nuclei
    x = ((image - image.min()) / np.ptp(image)).astype(np.float32)
    prob, dist, points = _candidates(x, tiny_model, inference_settings("cpu"), 0.3, None, None, None)
    assert len(prob) > 100
    libs = _openmp_runtimes()
    assert libs, "torch's and stardist's OpenMP runtimes are loaded"
    original = [lib.omp_get_max_threads() for lib in libs]
    try:
        for lib in libs:
            lib.omp_set_num_threads(2)
        several = non_maximum_suppression_sparse(dist, prob, points, nms_thresh=0.4)
        with single_threaded_openmp():
            assert [lib.omp_get_max_threads() for lib in libs] == [1] * len(libs)
            one = non_maximum_suppression_sparse(dist, prob, points, nms_thresh=0.4)
        assert [lib.omp_get_max_threads() for lib in libs] == [2] * len(libs)
    finally:
        for lib, n in zip(libs, original):
            lib.omp_set_num_threads(n)
    assert all(np.array_equal(a, b) for a, b in zip(several, one))
