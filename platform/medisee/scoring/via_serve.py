"""Batch scoring through a running Serve application instead of actor pools of its own.

`medisee score ... --via-serve APP` replaces the MLLM / verifier / decoder steps by one step that
sends each image (with all its queries) to the application's ingress through its deployment handle,
with at most `max_in_flight` requests outstanding per actor. The same graph answers (so the cluster
holds one copy of the models; only each image's model-sized inputs are sent); decode, output rows, errors and the exactly-once writer are shared
with the actor-pool path.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from medisee.scoring.stages import error_rows, image_of, output_table, result_row, sampled, scoreable


def served_version(app_name: str) -> str:
    """The version the application answers by default (its ingress's user_config)."""
    from ray import serve

    return serve.get_app_handle(app_name).served_version.remote().result()


class ServeStep:
    def __init__(self, app_name: str, model_info: dict, max_in_flight: int = 8, overlay_fraction: float = 0.0,
                 timeout_s: float = 120.0):  # fmt: skip
        from ray import serve

        self.handle = serve.get_app_handle(app_name)
        self.model_info, self.max_in_flight = model_info, max_in_flight
        self.overlay_fraction, self.timeout_s = overlay_fraction, timeout_s
        self.sizes = self.handle.input_sizes.remote().result(timeout_s=timeout_s)

    def prepared(self, row: dict):
        """The model-sized inputs of the row's image: what crosses to the application, whatever the
        image's size (a decoded 4k radiograph would exceed the 4 MiB of a gRPC message)."""
        from medisee.infer.images import prepare_image

        return prepare_image(image_of(row), self.sizes["clip_size"], self.sizes["sam_size"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers = self._ask([r for r in rows if scoreable(r)])
        return output_table(rows, lambda row: self._results(row, *answers[row["image_id"]]))

    def _ask(self, rows: list[dict]) -> dict[str, tuple]:
        """image_id -> (results, timings) or (None, error), at most max_in_flight outstanding."""
        answers: dict[str, tuple] = {}
        for start in range(0, len(rows), self.max_in_flight):
            window = rows[start : start + self.max_in_flight]
            started = time.perf_counter()
            pending = [
                self.handle.answer.remote(self.prepared(r), r["queries"], self.model_info["ref"])
                for r in window
            ]
            for row, response in zip(window, pending, strict=True):
                try:
                    answers[row["image_id"]] = response.result(timeout_s=self.timeout_s)
                except Exception as exc:  # the application's failure becomes this image's error
                    answers[row["image_id"]] = (None, exc)
            for row in window:
                row["t_serve"] = (time.perf_counter() - started) / len(window)
        return answers

    def _results(self, row: dict, results, timings) -> list[dict]:
        if results is None:
            row.update(error="timeout" if "Timeout" in type(timings).__name__ else "model_error",
                       error_detail=f"{type(timings).__name__}: {timings}"[:300], error_stage="serve")  # fmt: skip
            return error_rows(row)
        row.update(t_mllm=timings["mllm_s"], t_verifier=timings["verifier_s"], t_decoder=timings["decoder_s"])
        out = [
            result_row(row, j, r, r.mask_score is not None, self.model_info) for j, r in enumerate(results)
        ]
        if self.overlay_fraction and sampled(row["image_id"], self.overlay_fraction):
            from medisee.scoring.overlays import draw_overlay

            first = (
                results[0].similarity if results[0].similarity is not None else np.zeros((1, 1), np.float32)
            )
            maps = {"similarity": first.astype(np.float32).tobytes(), "similarity_side": first.shape[0]}
            out[0]["overlay_png"] = draw_overlay(image_of(row), out, maps)
        return out
