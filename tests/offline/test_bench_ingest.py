"""bench-ingest's summary over rounds: medians of the per-round ratios, the strictest reading beside
them, and the latency goal held in every round (the measuring itself runs in ``make bench-ingest``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from offline.bench.ingest import pictures, summarize


def _round(before: float, after: float, rate: float, p99: float) -> dict:
    ceiling = (before + after) / 2
    return {
        "ceiling": {"images_per_s": ceiling, "before_images_per_s": before, "after_images_per_s": after,
                    "ways": {"2 streams": {}}, "model_id": "m"},
        "sustained": {"items_per_s": rate, "steady_items_per_s": rate * 1.02,
                      "ratio_to_ceiling": round(rate / ceiling, 3),
                      "steady_ratio_to_ceiling": round(rate * 1.02 / ceiling, 3)},
        "latency_half_rate": {"rate_per_s": rate / 2, "events": 100, "p99_s": p99},
    }


def test_summary_takes_medians_over_rounds_and_the_best_single_ceiling_as_the_strictest_reading():
    report = {"rounds": [_round(100, 100, 95, 0.3), _round(90, 110, 80, 0.4), _round(95, 95, 90, 0.2)],
              "pipeline_in_process": {"items_per_s": 92.0}}
    summarize(report, np.array([0.1, 0.2, 0.3]))
    s = report["sustained"]
    assert s["ratio_per_round"] == [0.95, 0.8, 0.947]
    assert s["ratio_to_ceiling"] == 0.947  # the median round, not the mean (0.899) nor the best
    assert s["items_per_s"] == 90.0
    assert report["ceiling"]["best"] == 110  # a single measurement, not a round's mean
    assert s["ratio_to_best_ceiling"] == round(90 / 110, 3)
    assert report["pipeline_in_process"]["ratio_to_ceiling"] == 0.92  # against round 1's ceiling
    assert report["goals"] == {"ratio_ge_0.9": True, "p99_le_1s": True}


def test_latency_goal_must_hold_in_every_round_and_the_ratio_goal_at_the_median():
    report = {"rounds": [_round(100, 100, 95, 0.3), _round(100, 100, 85, 1.2), _round(100, 100, 88, 0.2)]}
    summarize(report, np.array([0.1, 0.2, 1.2]))
    assert report["sustained"]["ratio_to_ceiling"] == 0.88
    assert report["latency_half_rate"]["p99_per_round_s"] == [0.3, 1.2, 0.2]
    assert report["goals"] == {"ratio_ge_0.9": False, "p99_le_1s": False}


def test_task_thread_time_splits_the_busiest_threads_wall_time_into_cpu_waiting_and_the_rest():
    from offline.bench.ingest import task_thread_time

    before = {1: (10.0, 1.0), 2: (20.0, 2.0), 3: (5.0, 0.0)}
    # threads 1 and 2 ran the model (9 and 8 s of a 10 s window, 0.5 s waiting each); 3 is the
    # Celery main thread (0.1 s) and 4 a thread that started during the window (0.2 s)
    after = {1: (19.0, 1.5), 2: (28.0, 2.5), 3: (5.1, 0.0), 4: (0.2, 0.0)}
    t = task_thread_time(before, after, threads=2, wall=10.0)
    assert t == {"threads": 2, "on_cpu": 0.85, "waiting_for_cpu": 0.05, "blocked_or_idle": 0.1}
    assert task_thread_time(before, {}, threads=2, wall=10.0) is None  # the worker was gone


def test_thread_sched_reads_this_process_threads():
    import os
    from pathlib import Path

    import pytest

    from offline.bench.ingest import thread_sched

    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat").exists():
        pytest.skip("this kernel keeps no per-thread schedstats")
    mine = thread_sched(os.getpid())
    assert os.getpid() in mine  # the main thread's id is the process id
    on, waiting = mine[os.getpid()]
    assert on > 0 and waiting >= 0


def test_spread_gives_each_process_its_own_warm_up_keys_and_a_disjoint_share_of_the_rest():
    from offline.bench.ingest import _spread

    keys = [f"k{i}" for i in range(23)]
    shares = _spread(keys, warm=2, parts=3)
    assert [s[:2] for s in shares] == [["k0", "k1"], ["k2", "k3"], ["k4", "k5"]]
    rest = [k for s in shares for k in s[2:]]
    assert rest == keys[6:]  # every key once, in order
    assert [len(s) - 2 for s in shares] == [6, 6, 5]


def _timed_share(n: int, start) -> dict:
    import time

    if n < 0:
        raise ValueError("bad share")
    start()
    t0 = time.time()
    return {"items": n, "started_at": t0, "ended_at": t0 + 0.01 * n}


def test_in_processes_starts_the_shares_together_and_reports_failures():
    import pytest

    from offline.bench.ingest import _aggregate, in_processes

    results = in_processes(_timed_share, [{"n": 3}, {"n": 5}])
    n, wall = _aggregate(results, "items")
    assert n == 8
    assert 0.049 <= wall < 5.0  # the longest share (0.05 s) plus the spread of the starts
    with pytest.raises(RuntimeError, match="bad share"):
        in_processes(_timed_share, [{"n": 1}, {"n": -1}])


def _grocery_layout(root: Path, photos: int) -> Path:
    """A dataset in the GroceryStore layout with one class and ``photos`` distinct train photos."""
    from PIL import Image

    ds = root / "dataset"
    (ds / "train").mkdir(parents=True)
    (ds / "classes.csv").write_text("Class Name,Class ID,Coarse Class Name,Coarse Class ID,Iconic,Desc\n"
                                    "Apple,0,Apple,0,/iconic-images-and-descriptions/Fruit/Apple/a.jpg,/x.txt\n")
    lines = []
    for i in range(photos):
        Image.new("RGB", (40, 30), (i * 40 % 256, 90, 200)).save(ds / "train" / f"p{i}.jpg")
        lines.append(f"train/p{i}.jpg, 0, 0")
    (ds / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_pictures_are_the_splits_photos_copied_in_and_repeated_past_its_size(tmp_path: Path) -> None:
    data = _grocery_layout(tmp_path / "ds", 3)
    objects = tmp_path / "objects"
    keys = pictures(objects, 7, seed=1, data=data, split="train")
    assert keys == [f"img/{i:05d}.jpg" for i in range(7)]
    blobs = [(objects / k).read_bytes() for k in keys]
    sources = {(data / "dataset" / "train" / f"p{i}.jpg").read_bytes() for i in range(3)}
    assert set(blobs[:3]) == sources  # every photo before any repeats
    assert blobs[3:6] == blobs[:3] and blobs[6] == blobs[0]
    assert pictures(tmp_path / "again", 3, seed=1, data=data, split="train") == keys[:3]
    assert [(tmp_path / "again" / k).read_bytes() for k in keys[:3]] == blobs[:3]  # the seed fixes the order


def test_pictures_without_data_are_generated(tmp_path: Path) -> None:
    from PIL import Image

    keys = pictures(tmp_path, 4, seed=2)
    with Image.open(tmp_path / keys[0]) as im:
        assert len(keys) == 4 and im.size == (128, 128)
