import pytest

from proxy.settings import ConfigError, Settings, normalise_database_url

BASE = {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "tok"}


def test_defaults():
    s = Settings.from_env(BASE)
    assert s.twilio_api_base_url == "https://api.twilio.com"
    assert s.session_window_seconds == 86400 and s.window_safety_margin_seconds == 60
    assert s.public_base_url is None
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("instance/proxy.sqlite3")


@pytest.mark.parametrize(
    "env, variable",
    [
        ({}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "a" * 32}, "TWILIO_AUTH_TOKEN"),
        ({**BASE, "TWILIO_ACCOUNT_SID": "nope"}, "TWILIO_ACCOUNT_SID"),
        ({**BASE, "SESSION_WINDOW_SECONDS": "a day"}, "SESSION_WINDOW_SECONDS"),
        ({**BASE, "SESSION_WINDOW_SECONDS": "0"}, "SESSION_WINDOW_SECONDS"),
        ({**BASE, "WINDOW_SAFETY_MARGIN_SECONDS": "-1"}, "WINDOW_SAFETY_MARGIN_SECONDS"),
        ({**BASE, "WINDOW_SAFETY_MARGIN_SECONDS": "90000"}, "WINDOW_SAFETY_MARGIN_SECONDS"),
        ({**BASE, "TWILIO_API_BASE_URL": "ftp://x"}, "TWILIO_API_BASE_URL"),
        ({**BASE, "PUBLIC_BASE_URL": "proxy.example.com"}, "PUBLIC_BASE_URL"),
        ({**BASE, "DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({**BASE, "TWILIO_TIMEOUT_SECONDS": "0"}, "TWILIO_TIMEOUT_SECONDS"),
        ({**BASE, "LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({**BASE, "LOG_REDACT_NUMBERS": "maybe"}, "LOG_REDACT_NUMBERS"),
    ],
)
def test_invalid_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("postgres://u:p@h:5432/d", "postgresql+psycopg://u:p@h:5432/d"),
        ("postgresql://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
        ("postgresql+psycopg://u@h/d", "postgresql+psycopg://u@h/d"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_database_url_forms(raw, expected):
    assert normalise_database_url(raw) == expected


def test_public_base_url_trailing_slash_dropped():
    assert Settings.from_env({**BASE, "PUBLIC_BASE_URL": "https://p.example.com/"}).public_base_url == \
        "https://p.example.com"


def test_create_app_exits_with_a_message_naming_the_variables(monkeypatch, capsys):
    from proxy import create_app
    monkeypatch.delenv("TWILIO_ACCOUNT_SID", raising=False)
    monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        create_app()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "TWILIO_ACCOUNT_SID" in err and "TWILIO_AUTH_TOKEN" in err
