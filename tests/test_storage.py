import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medisee import storage


def test_local_round_trip(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"hello")
    assert storage.read_bytes(uri) == b"hello"
    assert storage.exists(uri)
    assert storage.list_files(str(tmp_path)) == [uri]
    assert not list((tmp_path / "a").glob("*.tmp-*"))


def test_file_scheme(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/x.txt", b"1")
    assert (tmp_path / "x.txt").read_bytes() == b"1"


@pytest.mark.integration
def test_s3_round_trip_through_pyarrow_and_boto3(s3_bucket):
    settings, root = s3_bucket
    uri = storage.join(root, "dir", "t.parquet")
    table = pa.table({"x": [1, 2, 3]})
    fs, path = storage.filesystem(uri, settings)
    assert isinstance(fs, pa.fs.S3FileSystem)
    pq.write_table(table, path, filesystem=fs)
    assert storage.exists(uri, settings)
    assert storage.list_files(root, (".parquet",), settings) == [uri]
    body = storage.boto3_client(settings).get_object(Bucket=root[5:], Key="dir/t.parquet")["Body"].read()
    assert body == storage.read_bytes(uri, settings)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("MEDISEE_S3_ENDPOINT", "http://127.0.0.1:9")
    assert storage.StorageSettings.resolve().endpoint == "http://127.0.0.1:9"
    assert storage.StorageSettings.resolve("http://other:1").endpoint == "http://other:1"


def test_upload_dir_keeps_relative_paths(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_bytes(b"1")
    (src / "a" / "b" / "deep.bin").write_bytes(b"2")
    assert storage.upload_dir(src, str(tmp_path / "dst")) == 2
    assert (tmp_path / "dst" / "a" / "b" / "deep.bin").read_bytes() == b"2"


def test_compressed_names_are_stored_and_read_as_given(s3_bucket, tmp_path):
    """pyarrow's streams gzip/gunzip by file name unless told not to: a .nii.gz must go to S3 (and come
    back) byte for byte, not gzipped twice on write and inflated without a bound on read."""
    import gzip

    settings, root = s3_bucket
    payload = gzip.compress(b"\x00" * 100_000)
    for uri in (f"{root}/labels.nii.gz", str(tmp_path / "labels.nii.gz")):
        storage.write_bytes(uri, payload, settings)
        assert storage.read_bytes(uri, settings) == payload
    bucket = root.removeprefix("s3://")
    stored = storage.boto3_client(settings).get_object(Bucket=bucket, Key="labels.nii.gz")["Body"].read()
    assert stored == payload and (tmp_path / "labels.nii.gz").read_bytes() == payload
