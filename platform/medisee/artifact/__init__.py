"""The model artifact: one self-describing folder every consumer loads (weights, config, tokenizer,
verifier calibration, golden answer, manifest). This layer sits above model/verify/infer and below
the front ends (train, scoring, serving) and the CLI.

    model_dir     save, load, describe; the Predictor of an artifact
    fetch         local folder, s3://, runs:/ and models:/ references
    golden        the golden query and answer stored with the weights, checked at load
    calibration   the verifier calibration stored into a run's artifact
"""
