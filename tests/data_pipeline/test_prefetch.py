"""Stage 1 decodes ahead in a thread pool while the detector works; results do not depend on it."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from idforge.data_pipeline.curate import _prefetch, run_curation
from idforge.data_pipeline.filters import FilterConfig
from idforge.data_pipeline.job import CurateConfig


def test_prefetch_submits_a_window_ahead_and_keeps_order():
    submitted = []

    def work(x):
        submitted.append(x)
        return x * x

    with ThreadPoolExecutor(1) as pool:
        gen = _prefetch(pool, work, list(range(10)), window=3)
        first_item, first = next(gen)
        assert first_item == 0 and first.result() == 0
        pool.submit(lambda: None).result()  # let the single worker drain what was submitted
        assert submitted == [0, 1, 2, 3]  # the window (3) beyond the item handed out, no more
        rest = [(i, f.result()) for i, f in gen]
    assert rest == [(i, i * i) for i in range(1, 10)]


def test_decode_threads_do_not_change_the_shards(synthid_folder, tmp_path):
    def run(threads, out):
        cfg = CurateConfig(
            input=str(synthid_folder),
            output=str(out),
            resolution=32,
            unit_size=7,
            embedder=None,
            detect_batch_size=3,
            decode_threads=threads,
            filters=FilterConfig(min_resolution=16, min_face_px=4, duplicate_threshold=None),
        )
        manifest = run_curation(cfg)
        return manifest, {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}

    one, shards_one = run(1, tmp_path / "one")
    four, shards_four = run(4, tmp_path / "four")
    assert one["images_accepted"] == four["images_accepted"] > 0
    assert shards_one == shards_four
