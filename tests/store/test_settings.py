"""Settings: nothing read at import or construction, the environment only through from_env(), errors naming
the SEPEN_* variable, and each process reading only its own part."""

import pytest

from sepen_store.settings import GatewaySettings, Settings, SettingsError, WorkerSettings, setting_names


def test_constructing_reads_no_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SEPEN_JOB_LEASE_S", "7")
    monkeypatch.setenv("SEPEN_DATABASE_URL", "postgresql+psycopg://elsewhere/db")
    settings = WorkerSettings(data_dir=tmp_path)
    assert settings.job_lease_s == 120.0 and settings.database_url == f"sqlite:///{tmp_path.resolve()}/sepen.db"
    assert WorkerSettings.from_env().job_lease_s == 7.0


def test_each_part_reads_its_own_variables(monkeypatch):
    monkeypatch.setenv("SEPEN_MAX_BODY_BYTES", "4096")
    monkeypatch.setenv("SEPEN_CHECKPOINT_EVERY", "9")
    assert GatewaySettings.from_env().max_body_bytes == 4096 and not hasattr(GatewaySettings(), "checkpoint_every")
    assert WorkerSettings.from_env().checkpoint_every == 9 and not hasattr(WorkerSettings(), "max_body_bytes")
    assert "SEPEN_MAX_BODY_BYTES" in setting_names() and "SEPEN_CHECKPOINT_EVERY" in setting_names()


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("SEPEN_DTYPE", "fp8", "SEPEN_DTYPE: must be one of fp32, fp16, bf16"),
        ("SEPEN_JOB_LEASE_S", "soon", "SEPEN_JOB_LEASE_S:"),
        ("SEPEN_CHECKPOINT_EVERY", "0", "SEPEN_CHECKPOINT_EVERY:"),
        ("SEPEN_MODELS", "junk", "SEPEN_MODELS: entry 'junk'"),
        ("SEPEN_DEFAULT_MODEL", "nope", "SEPEN_DEFAULT_MODEL 'nope'"),
        ("SEPEN_BLOB_BACKEND", "gcs", "SEPEN_BLOB_BACKEND: Input should be 'database' or 's3'"),
        ("SEPEN_BLOB_BACKEND", "s3", "SEPEN_S3_BUCKET: name the bucket when SEPEN_BLOB_BACKEND is s3"),
        ("SEPEN_S3_ACCESS_KEY_ID", "only-half", "SEPEN_S3_ACCESS_KEY_ID and SEPEN_S3_SECRET_ACCESS_KEY: set both"),
        ("SEPEN_IMAGE_RETENTION_DAYS", "-1", "SEPEN_IMAGE_RETENTION_DAYS:"),
    ],
)
def test_a_bad_variable_is_named(monkeypatch, name, value, fragment):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=fragment.replace("(", r"\(")):
        WorkerSettings.from_env()


def test_default_model_is_the_first_named_or_sepen_toy(monkeypatch):
    assert Settings().default_model == "sepen-toy" and list(Settings().models) == ["sepen-tiny", "sepen-toy"]
    monkeypatch.setenv("SEPEN_MODELS", "sd15=/models/sd15,sepen-toy=toy")
    assert Settings.from_env().default_model == "sd15"
    frozen = Settings()
    with pytest.raises(ValueError):
        frozen.default_model = "other"
    assert frozen.with_(broker_url="redis://x").broker_url == "redis://x" and frozen.broker_url == ""
