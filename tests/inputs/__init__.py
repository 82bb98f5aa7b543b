"""The standing bad-input suite's catalogue (cases.py); its tests run it against both front ends:
tests/serving/test_inputs_http.py (POST /v1/segment) and tests/scoring/test_inputs_batch.py
(`medisee score`)."""
