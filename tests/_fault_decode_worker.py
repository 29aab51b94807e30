"""Run two epochs of a Loader in a process of its own and print what they delivered, as JSON.

Used by tests/test_faults_decode.py for payloads that could crash a decoder: a crash (a
segmentation fault) then fails that test with its exit code instead of killing pytest.

    python tests/_fault_decode_worker.py DATA BACKEND NUM_WORKERS VERIFY_CRC AUGMENT
"""
from __future__ import annotations

import json
import sys
import warnings

import pipeline


def main(data: str, backend: str, num_workers: int, verify_crc: bool, augment: str | None) -> dict:
    ds = pipeline.open_dataset(data)
    opts = pipeline.LoaderOptions.of(verify_crc=verify_crc, max_corrupt_fraction=None)
    loader = pipeline.Loader(ds, 64, keep=1.0, policy="full", backend=backend, device="cpu",
                             augment=augment, num_workers=num_workers, options=opts)
    out = {"epochs": []}
    try:
        for e in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ids = [int(i) for b in loader.epoch(e) for i in b.ids.tolist() if i >= 0]
            st = loader.stats(e)
            out["epochs"].append({"delivered": ids, "corrupt": sorted(st.corrupt_ids),
                                  "steps": loader.steps_per_epoch(e),
                                  "warnings": [str(w.message) for w in caught
                                               if issubclass(w.category, RuntimeWarning)]})
    finally:
        loader.close()
    return out


if __name__ == "__main__":
    a = sys.argv[1:]
    res = main(a[0], a[1], int(a[2]), a[3] == "1", None if a[4] == "none" else a[4])
    print("RESULT " + json.dumps(res), flush=True)
