import pytest

from proxy.settings import ConfigError, Settings, normalise_database_url
from proxy.policy_file import Fallback, PolicyFileError

BASE = {"TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "tok"}


def test_defaults():
    s = Settings.from_env(BASE)
    assert s.twilio_api_base_url == "https://api.twilio.com"
    assert s.session_window_seconds == 86400 and s.window_safety_margin_seconds == 60
    assert s.public_base_url is None
    assert s.database_url.startswith("sqlite:///") and s.database_url.endswith("instance/proxy.sqlite3")
    assert s.worker_concurrency == 10


def test_a_policy_files_reroute_without_a_fallback_names_the_policy_file_not_a_variable_never_set(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[actions]\n"twilio/text" = "reroute"\n')
    with pytest.raises(ConfigError, match=r"^POLICY_FILE's \[actions\] \(reroute for twilio/text\) needs"):
        Settings.from_env({**BASE, "POLICY_FILE": str(policy)})
    with pytest.raises(ConfigError, match="got 'LOUD'"):
        Settings.from_env({**BASE, "LOG_LEVEL": "LOUD"})


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
        # One database per process, never migrated for the others; a driver not installed: tracebacks at start.
        ({**BASE, "DATABASE_URL": "sqlite://"}, "DATABASE_URL"),
        ({**BASE, "DATABASE_URL": "sqlite:///:memory:"}, "DATABASE_URL"),
        ({**BASE, "DATABASE_URL": "sqlite:///file:mem1?mode=memory&uri=true"}, "DATABASE_URL"),
        ({**BASE, "DATABASE_URL": "sqlite:///file::memory:?cache=shared&uri=true"}, "DATABASE_URL"),
        ({**BASE, "DATABASE_URL": "sqlite+aiosqlite:////tmp/a.db"}, "DATABASE_URL"),
        ({**BASE, "TWILIO_TIMEOUT_SECONDS": "0"}, "TWILIO_TIMEOUT_SECONDS"),
        ({**BASE, "LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({**BASE, "LOG_REDACT_NUMBERS": "maybe"}, "LOG_REDACT_NUMBERS"),
        ({**BASE, "TWILIO_AUTH_TOKEN_PREVIOUS": " tok "}, "TWILIO_AUTH_TOKEN_PREVIOUS"),  # the token itself
        ({**BASE, "WORKER_CONCURRENCY": "0"}, "WORKER_CONCURRENCY"),
        ({**BASE, "WORKER_CONCURRENCY": "eight"}, "WORKER_CONCURRENCY"),
        ({**BASE, "WORKER_CONCURRENCY": "2.5"}, "WORKER_CONCURRENCY"),
    ],
)
def test_invalid_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "variable, value",
    [
        # Each accepted once meant a 500 on every request (an OverflowError adding the timedelta or
        # computing urllib3's deadline), or a worker that never woke up again.
        ("SESSION_WINDOW_SECONDS", "999999999999999"),
        ("SESSION_WINDOW_SECONDS", "604801"),
        ("TWILIO_TIMEOUT_SECONDS", "inf"),
        ("TWILIO_TIMEOUT_SECONDS", "nan"),
        ("TWILIO_TIMEOUT_SECONDS", "1e12"),
        ("TWILIO_TIMEOUT_SECONDS", "61"),
        ("HOLD_TTL_SECONDS", "999999999999999"),
        ("HOLD_TTL_SECONDS", "31536001"),
        ("CONTENT_CACHE_SECONDS", "999999999999999"),
        ("CONTENT_CACHE_SECONDS", "86401"),
        ("OUTBOX_RETRY_SCHEDULE", "0,5,999999999999999"),
        ("OUTBOX_RETRY_SCHEDULE", "0,604801"),
        ("OUTBOX_LEASE_SECONDS", "999999999999999"),
        ("OUTBOX_LEASE_SECONDS", "3601"),
        ("WORKER_POLL_SECONDS", "inf"),
        ("WORKER_POLL_SECONDS", "nan"),
        ("WORKER_POLL_SECONDS", "1e12"),
        ("WORKER_POLL_SECONDS", "301"),
        ("MAX_CONTENT_LENGTH", "999999999999999"),
        ("BODY_READ_TIMEOUT_SECONDS", "301"),
        ("BODY_READ_TIMEOUT_SECONDS", "inf"),
        ("WORKER_CONCURRENCY", "999999999999999"),
        ("WORKER_CONCURRENCY", "65"),
    ],
)
def test_numbers_out_of_range_name_the_variable_and_the_range(variable, value):
    with pytest.raises(ConfigError, match=rf"{variable} must be .*at most"):
        Settings.from_env({**BASE, variable: value})


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "15", "16"])
def test_forward_timeout_out_of_range_names_its_open_upper_bound(value):
    # 15 itself is refused (Twilio gives up on a webhook after 15 s): the message for 0 said "at most
    # 15", so an operator who then set 15 was refused with a second, different range.
    with pytest.raises(ConfigError, match=r"FORWARD_TIMEOUT_SECONDS must be greater than 0 and below 15\b"):
        Settings.from_env({**BASE, "FORWARD_TIMEOUT_SECONDS": value})
    assert Settings.from_env({**BASE, "FORWARD_TIMEOUT_SECONDS": "14.9"}).forward_timeout_seconds == 14.9


def test_numbers_at_the_ends_of_their_range_are_accepted():
    s = Settings.from_env({**BASE, "SESSION_WINDOW_SECONDS": "604800", "TWILIO_TIMEOUT_SECONDS": "60",
                           "HOLD_TTL_SECONDS": "31536000", "CONTENT_CACHE_SECONDS": "86400",
                           "OUTBOX_RETRY_SCHEDULE": "0,604800", "OUTBOX_LEASE_SECONDS": "3600",
                           "WORKER_POLL_SECONDS": "300", "MAX_CONTENT_LENGTH": str(16 * 1024 * 1024),
                           "WORKER_CONCURRENCY": "64"})
    assert (s.session_window_seconds, s.twilio_timeout_seconds, s.hold_ttl_seconds, s.content_cache_seconds,
            s.retry_schedule, s.outbox_lease_seconds, s.worker_poll_seconds, s.max_content_length,
            s.worker_concurrency) == (604800, 60.0, 31536000, 86400, (0, 604800), 3600, 300.0, 16 * 1024 * 1024, 64)
    low = Settings.from_env({**BASE, "SESSION_WINDOW_SECONDS": "1", "WINDOW_SAFETY_MARGIN_SECONDS": "0",
                             "TWILIO_TIMEOUT_SECONDS": "0.5", "HOLD_TTL_SECONDS": "1", "CONTENT_CACHE_SECONDS": "0",
                             "WORKER_POLL_SECONDS": "0.1", "MAX_CONTENT_LENGTH": "1024", "WORKER_CONCURRENCY": "1"})
    assert (low.session_window_seconds, low.twilio_timeout_seconds, low.worker_poll_seconds,
            low.worker_concurrency) == (1, 0.5, 0.1, 1)


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"TWILIO_ACCOUNT_SID": "AC" + "z" * 32}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_ACCOUNT_SID": "AC" + "a" * 31 + "\u00e9"}, "TWILIO_ACCOUNT_SID"),
        ({"TWILIO_API_KEYS": "SK" + "z" * 32 + ":secret"}, "TWILIO_API_KEYS"),
        ({"TWILIO_API_KEYS": "SK" + "a" * 32 + ":secret,SK" + "g" * 32 + ":other"}, "TWILIO_API_KEYS"),
    ],
)
def test_sids_are_32_hex_characters_as_their_messages_say(env, variable):
    with pytest.raises(ConfigError, match=rf"{variable} .*32 hex"):
        Settings.from_env({**BASE, **env})
    mixed_case = "AC" + "0123456789ABCDEF" * 2  # Twilio's own pattern: ^AC[0-9a-fA-F]{32}$
    assert Settings.from_env({**BASE, "TWILIO_ACCOUNT_SID": mixed_case}).account_sid == mixed_case


def test_the_outbox_lease_outlasts_a_delivery():
    """A worker must still hold an item when its delivery ends, or another worker delivers it too."""
    assert Settings.from_env(BASE).outbox_lease_seconds == 120
    short_sends = {"TWILIO_TIMEOUT_SECONDS": "3"}  # a fallback send then takes at most 3 x 3 s
    assert Settings.from_env({**BASE, **short_sends, "OUTBOX_LEASE_SECONDS": "15"}).outbox_lease_seconds == 15
    for env in ({"OUTBOX_LEASE_SECONDS": "14"}, {"FORWARD_TIMEOUT_SECONDS": "10.5", "OUTBOX_LEASE_SECONDS": "15"}):
        with pytest.raises(ConfigError, match=r"OUTBOX_LEASE_SECONDS must be at least 1[56] \(FORWARD_TIMEOUT_SECONDS"):
            Settings.from_env({**BASE, **short_sends, **env})
    # A fallback send after a late 63016: the Content, its approval and the create, each up to TWILIO_TIMEOUT_SECONDS.
    # Then up to ATTEMPT_FLUSH_SECONDS (1) for its attempt row, the item still `sending`.
    assert Settings.from_env({**BASE, "TWILIO_TIMEOUT_SECONDS": "60", "OUTBOX_LEASE_SECONDS": "186"})
    with pytest.raises(ConfigError, match=r"OUTBOX_LEASE_SECONDS must be at least 186 .*3 x TWILIO_TIMEOUT_SECONDS \+ 1"):
        Settings.from_env({**BASE, "TWILIO_TIMEOUT_SECONDS": "60", "OUTBOX_LEASE_SECONDS": "185"})


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


@pytest.mark.parametrize("name", ["FORWARD_INBOUND_URL", "FORWARD_STATUS_URL"])
@pytest.mark.parametrize("url", ["https://app.example.com/twilio/", "http://127.0.0.1:5000/", "https://app.example.com/t"])
def test_a_forward_url_is_kept_as_written_trailing_slash_and_all(name, url):
    """Posted to and signed for as the app's route is written: /twilio/ is not /twilio to Flask or Django."""
    settings = Settings.from_env({**BASE, name: url})
    assert (settings.forward_inbound_url if name == "FORWARD_INBOUND_URL" else settings.forward_status_url) == url


def test_create_app_exits_with_a_message_naming_the_variables(monkeypatch, capsys):
    from proxy import create_app
    monkeypatch.delenv("TWILIO_ACCOUNT_SID", raising=False)
    monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        create_app()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "TWILIO_ACCOUNT_SID" in err and "TWILIO_AUTH_TOKEN" in err


HX = "HX" + "1" * 32


def test_reroute_is_the_default_when_a_fallback_is_set():
    s = Settings.from_env({**BASE, "FALLBACK_CONTENT_SID": HX, "FALLBACK_CONTENT_VARIABLES": '{"1": "{profile_name}"}'})
    assert s.policy.default_action == "reroute"
    assert s.fallback.content_sid == HX and s.fallback.render("Ada") == '{"1": "Ada"}'
    # Unknown (the user never wrote) or blank: never "", which Twilio refuses with 21656.
    assert s.fallback.render(None) == s.fallback.render(" ") == '{"1": "there"}'
    named = Settings.from_env({**BASE, "FALLBACK_CONTENT_SID": HX, "FALLBACK_PROFILE_NAME_DEFAULT": "you",
                               "FALLBACK_CONTENT_VARIABLES": '{"1": "Hi {profile_name}"}'})
    assert named.fallback.render(None) == '{"1": "Hi you"}'
    blank = Settings.from_env({**BASE, "FALLBACK_CONTENT_SID": HX, "FALLBACK_PROFILE_NAME_DEFAULT": " ",
                               "FALLBACK_CONTENT_VARIABLES": '{"1": "{profile_name}"}'})
    assert blank.fallback.render(None) == '{"1": "there"}'  # blank means unset, as for every variable
    assert Settings.from_env(BASE).policy.default_action == "block"
    assert Settings.from_env({**BASE, "FALLBACK_CONTENT_SID": HX, "OUT_OF_WINDOW_ACTION": "block"}).policy \
        .default_action == "block"


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"OUT_OF_WINDOW_ACTION": "reroute"}, "FALLBACK_CONTENT_SID"),
        ({"OUT_OF_WINDOW_ACTION": "drop"}, "OUT_OF_WINDOW_ACTION"),
        ({"BUTTON_RULE": "loose"}, "BUTTON_RULE"),
        ({"FALLBACK_CONTENT_SID": "HX123"}, "content_sid"),
        ({"FALLBACK_CONTENT_SID": HX, "FALLBACK_CONTENT_VARIABLES": "{"}, "FALLBACK_CONTENT_VARIABLES"),
        ({"FALLBACK_CONTENT_SID": HX, "FALLBACK_CONTENT_VARIABLES": '{"1": 2}'}, "variables"),
        ({"FALLBACK_CONTENT_VARIABLES": '{"1": "x"}'}, "FALLBACK_CONTENT_SID"),
        ({"FALLBACK_CONTENT_SID": HX, "FALLBACK_CONTENT_VARIABLES": '{"1": ""}'}, "variables"),
        ({"FALLBACK_CONTENT_SID": HX, "FALLBACK_CONTENT_VARIABLES": '{"1": " "}'}, "variables"),
        ({"FALLBACK_PROFILE_NAME_DEFAULT": "you"}, "FALLBACK_CONTENT_SID"),
        ({"CONTENT_CACHE_SECONDS": "-5"}, "CONTENT_CACHE_SECONDS"),
        ({"TWILIO_CONTENT_BASE_URL": "content.twilio.com"}, "TWILIO_CONTENT_BASE_URL"),
        ({"POLICY_FILE": "/nonexistent/policy.toml"}, "POLICY_FILE"),
    ],
)
def test_policy_settings_errors_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({**BASE, **env})


def test_policy_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(f'''
[actions]
"twilio/list-picker" = "block"
"twilio/text" = "reroute"

[fallbacks."whatsapp:14155550100"]
content_sid = "{HX}"
variables = {{ "1" = "{{profile_name}}" }}

[fallbacks."whatsapp:+14155550101"]
content_sid = "{HX}"
variables = {{ "1" = "{{profile_name}}" }}
profile_name_default = "cliente"
''')
    s = Settings.from_env({**BASE, "POLICY_FILE": str(path)})
    assert s.policy.action_for("twilio/list-picker") == "block"
    assert s.policy.action_for("twilio/text") == "reroute"
    assert s.policy.action_for("twilio/media") == "block"
    assert s.fallback_for("whatsapp:+14155550100").content_sid == HX
    assert s.fallback_for("whatsapp:+19999999999") is None
    assert s.fallback_for("whatsapp:+14155550100").render(None) == '{"1": "there"}'
    assert s.fallback_for("whatsapp:+14155550101").render(None) == '{"1": "cliente"}'


@pytest.mark.parametrize(
    "text, line",
    [
        ('[actions]\n"twilio/text" = "reroute"\n"twilio/nope" = "block"\n', 3),
        ('[actions]\n\n"twilio/text" = "explode"\n', 3),
        ('[actions]\n"twilio/text" = \n', 2),  # TOML syntax error: tomllib names the line
        ('[fallbacks."whatsapp:+1415"]\ncontent_sid = "HX1"\n', 1),
        ('\n[routing]\nx = 1\n', 2),
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\nvariables = {{ "1" = "" }}\n', 1),
        (f'\n[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\nprofile_name_default = ""\n', 2),
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\nprofile_name_default = 3\n', 1),
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\nprofile_default = "x"\n', 1),
        # A plain number is an SMS sender: a fallback keyed by it never matched a WhatsApp send.
        (f'\n[fallbacks."+14155550100"]\ncontent_sid = "{HX}"\n', 2),
        (f'[fallbacks."messenger:1234567"]\ncontent_sid = "{HX}"\n', 1),
        # A BSUID is a user's id: a send from it is refused (21212), so its fallback would never be used.
        (f'\n\n[fallbacks."whatsapp:US.13491208655302741918"]\ncontent_sid = "{HX}"\n', 3),
        # What Twilio refuses in a variable (21656): a tab, a newline, more than four spaces in a row.
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\nvariables = {{ "1" = "a\\tb" }}\n', 1),
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\nvariables = {{ "1" = "a     b" }}\n', 1),
        # Review (session 15): a section that is no table was an AttributeError traceback.
        ('# policy\nactions = "x"\n', 2),
        ('\n\nfallbacks = 5\n', 3),
        # An MG key that is no Messaging Service SID never matched a send, yet counted as reroute's fallback.
        (f'[fallbacks.MG123]\ncontent_sid = "{HX}"\n', 1),
        # Two spellings of one sender: the second replaced the first without a word.
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\n\n'
         f'[fallbacks."whatsapp:+1 (415) 555-0100"]\ncontent_sid = "{HX}"\n', 4),
        # ... spelt with spaces alone: compacted, it was the first one's line (review, session 19).
        (f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\n\n'
         f'[fallbacks."whatsapp:+1 415 555 0100"]\ncontent_sid = "{HX}"\n', 4),
        (f'[fallbacks."whatsapp:+1 415 555 0100"]\ncontent_sid = "{HX}"\n\n'
         f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}"\n', 4),
        # A comment naming the key came first, and was named as the line.
        ('# "twilio/text" used to be rerouted\n[actions]\n"twilio/card" = "block"\n"twilio/text" = "rerout"\n', 4),
        # Dotted keys, spaced headers, an array of tables, a longer key starting with the one at fault.
        ('\nactions."twilio/text" = "allow"\n', 2),
        ('\n\nfallbacks."whatsapp:+14155550100".content_sid = "bad"\n', 3),
        ('\n[ fallbacks . "whatsapp:+14155550100" ]\ncontent_sid = "bad"\n', 2),
        ('\n[[actions]]\n', 2),
        (f'[fallbacks.MG{"0" * 32}]\ncontent_sid = "{HX}"\n[fallbacks.MG00000]\ncontent_sid = "{HX}"\n', 3),
    ],
)
def test_invalid_policy_file_names_the_line(tmp_path, text, line):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"POLICY_FILE.*line {line}"):
        Settings.from_env({**BASE, "POLICY_FILE": str(path)})


def test_a_policy_file_that_is_not_utf8_is_one_line_and_one_with_a_bom_is_read(tmp_path):
    """Latin-1 text was a UnicodeDecodeError traceback; a byte-order mark, a cryptic "Invalid statement"."""
    path = tmp_path / "policy.toml"
    path.write_bytes(b'[actions]\n"twilio/text" = "block" # caf\xe9\n')
    with pytest.raises(ConfigError, match=r"POLICY_FILE.*line 2: not UTF-8"):
        Settings.from_env({**BASE, "POLICY_FILE": str(path)})
    path.write_bytes(b'\xef\xbb\xbf[actions]\n"twilio/text" = "block"\n')
    assert Settings.from_env({**BASE, "POLICY_FILE": str(path)}).policy.action_for("twilio/text") == "block"


def test_fallback_variables_are_checked_as_they_render():
    """A user's name and the default are rendered with every run of whitespace as one space and none at their
    ends: what Twilio refuses (21656: a tab, a newline, more than four spaces in a row) is judged on that."""
    three = Fallback(HX, {"1": "Hi   {profile_name}"}, profile_name_default="  there ")
    assert three.render(None) == '{"1": "Hi   there"}' and three.render("  Ada\t Lovelace ") == '{"1": "Hi   Ada Lovelace"}'
    assert Fallback(HX, {"1": "a   {profile_name}  b"}).render("x") == '{"1": "a   x  b"}'
    with pytest.raises(PolicyFileError, match="'2'"):
        Fallback(HX, {"1": "a   {profile_name}   b", "2": "tab\there"})


def test_policy_file_content_sid_is_the_whole_value(tmp_path):
    """`$` also matches before a trailing newline: `HX…\\n` must not pass as a sid and reach Twilio."""
    path = tmp_path / "policy.toml"
    path.write_text(f'[fallbacks."whatsapp:+14155550100"]\ncontent_sid = "{HX}\\n"\n')
    with pytest.raises(ConfigError, match="content_sid"):
        Settings.from_env({**BASE, "POLICY_FILE": str(path)})


def test_the_settings_repr_holds_no_secret():
    """A Settings in a traceback or a debug print must not carry the secrets it holds."""
    s = Settings.from_env({**BASE, "TWILIO_AUTH_TOKEN": "tok-SECRET-7f3a", "METRICS_TOKEN": "met-SECRET-1",
                           "TWILIO_API_KEYS": "SK" + "1" * 32 + ":key-SECRET-2",
                           "TWILIO_WEBHOOK_SHARED_KEYS": "kid:shared-SECRET-3",
                           "DATABASE_URL": "postgresql://proxy:db-SECRET-4@127.0.0.1/proxy"})
    assert s.auth_token == "tok-SECRET-7f3a"
    assert "SECRET" not in repr(s) and "SECRET" not in str(s)


@pytest.mark.parametrize("url", ["postgresql://proxy:pw-SECRET@db.internal:abc/proxy", "postgres://proxy:pw-SECRET@:5432x/p",
                                 "sqlite://relative:port:x/db"])
def test_a_database_url_sqlalchemy_cannot_read_is_one_line_without_its_password(url):
    with pytest.raises(ConfigError) as error:
        Settings.from_env({**BASE, "DATABASE_URL": url})
    assert "DATABASE_URL" in str(error.value) and "SECRET" not in str(error.value)


def test_the_previous_auth_token_is_optional_and_never_shown():
    assert Settings.from_env(BASE).previous_auth_token is None
    rotating = Settings.from_env({**BASE, "TWILIO_AUTH_TOKEN_PREVIOUS": "old-token"})
    assert rotating.previous_auth_token == "old-token" and "old-token" not in repr(rotating)


def test_a_retry_schedule_not_starting_with_the_immediate_first_attempt_is_refused():
    """Its first value is the first attempt's, always made at once: `60,120` ran one retry after 120 s."""
    with pytest.raises(ConfigError, match=r"OUTBOX_RETRY_SCHEDULE starts with the first attempt.*start it with 0"):
        Settings.from_env({**BASE, "OUTBOX_RETRY_SCHEDULE": "60,120"})
    assert Settings.from_env({**BASE, "OUTBOX_RETRY_SCHEDULE": "0,60,120"}).retry_schedule == (0, 60, 120)


@pytest.mark.parametrize("variable", ["FORWARD_INBOUND_URL", "FORWARD_STATUS_URL"])
def test_a_forward_url_longer_than_the_outbox_stores_is_refused(variable):
    """Stored with every queued webhook: PostgreSQL refused a longer one, and the webhook's whole transaction
    with it (message and window included), so every inbound message was answered 400 and no window opened."""
    url = "https://app.example/twilio?token=" + "e" * 2100
    with pytest.raises(ConfigError, match=rf"{variable} must be at most 2048 characters, got 2133"):
        Settings.from_env({**BASE, variable: url})
    assert getattr(Settings.from_env({**BASE, variable: url[:2048]}), variable.lower()) == url[:2048]


@pytest.mark.parametrize("variable", ["FORWARD_INBOUND_URL", "FORWARD_STATUS_URL", "PUBLIC_BASE_URL",
                                      "TWILIO_API_BASE_URL"])
def test_a_url_with_a_fragment_is_refused(variable):
    """`#rp=5xx` (Twilio's connection overrides) copied into a forward URL: never sent, yet signed for, so the
    app's own RequestValidator refused every forward and the outbox exhausted them."""
    with pytest.raises(ConfigError, match=rf"{variable} must not have a #fragment"):
        Settings.from_env({**BASE, variable: "https://app.example/twilio#rp=5xx"})


@pytest.mark.parametrize("variable", ["PUBLIC_BASE_URL", "TWILIO_API_BASE_URL", "TWILIO_CONTENT_BASE_URL"])
def test_a_base_url_with_a_query_is_refused(variable):
    with pytest.raises(ConfigError, match=rf"{variable} is a base URL, to which paths are added: it takes no"):
        Settings.from_env({**BASE, variable: "https://proxy.example/base?x=1"})
    assert Settings.from_env({**BASE, "FORWARD_INBOUND_URL": "https://app.example/t?token=1"}).forward_inbound_url


@pytest.mark.parametrize("url", ["https://app:s3cret-pw@app.example.com:99999/hook", "http://[::1/hook",
                                 "https://app:s3cret-pw@a b.example/hook",
                                 # No host, or port 0: accepted, every forward failed (or the start crashed).
                                 "http://app:s3cret-pw@:25599/in", "https://:443/in", "https://app.example:0/in"])
def test_a_url_urllib3_cannot_connect_to_is_refused_without_its_credentials(url):
    """Accepted, every forward failed with a 500 and an `unhandled_error` traceback quoting the URL, password
    and all."""
    with pytest.raises(ConfigError, match="FORWARD_INBOUND_URL is not a URL that can be used") as refused:
        Settings.from_env({**BASE, "FORWARD_INBOUND_URL": url})
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("variable, value", [
    ("HTTPS_PROXY", "http://proxyuser:s3cretpw@127.0.0.1:99999"),
    ("HTTPS_PROXY", "http://user:ab/cd@127.0.0.1:3128"),
    ("https_proxy", "http://[bad"),
    ("ALL_PROXY", "notaurl"),
    ("HTTPS_PROXY", "ftp://127.0.0.1:21"),
    ("HTTPS_PROXY", "http://user:s3cretpw@127.0.0.1:3128 "),  # urllib3 takes the value as it is, space and all
    ("Https_Proxy", "http://user:ab/cd@127.0.0.1:3128"),  # any case of the name counts for urllib
    ("HTTPS_proxy", "http://user:ab/cd@127.0.0.1:3128"),
    ("ALL_PROXY", "socks://alice:s3cretpw@127.0.0.1:1080"),  # GNOME's: no SOCKS version urllib3 knows
])
def test_an_outbound_proxy_that_cannot_be_used_names_its_variable_not_its_password(variable, value):
    """It stopped every process with urllib3's traceback, which quoted the URL, password and all."""
    with pytest.raises(ConfigError, match=rf"^{variable} is not a proxy URL") as refused:
        Settings.from_env({**BASE, variable: value})
    assert "s3cretpw" not in str(refused.value) and "ab/cd" not in str(refused.value)


def test_a_usable_outbound_proxy_passes(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    Settings.from_env({**BASE, "HTTPS_PROXY": "http://user:p%2Fw@127.0.0.1:3128", "REQUESTS_CA_BUNDLE": str(bundle)})


def test_a_socks_proxy_without_pysocks_says_so():
    import importlib.util

    if importlib.util.find_spec("socks") is not None:
        pytest.skip("PySocks is installed here")
    with pytest.raises(ConfigError, match=r"^ALL_PROXY is a SOCKS proxy, which needs PySocks"):
        Settings.from_env({**BASE, "ALL_PROXY": "socks5h://user:pw@127.0.0.1:1080"})


@pytest.mark.parametrize("env", [
    {"HTTP_PROXY": "not used for https"},
    {"HTTPS_PROXY": "bad", "https_proxy": "http://127.0.0.1:3128"},  # the lower-case one wins
    {"HTTPS_PROXY": "bad", "NO_PROXY": "api.twilio.com,content.twilio.com"},
    {"HTTPS_PROXY": "bad", "no_proxy": "*"},
    {"ALL_PROXY": "bad", "HTTPS_PROXY": "http://127.0.0.1:3128"},  # the scheme's own is chosen first
    {"HTTPS_PROXY": "bad", "no_proxy": "", "NO_PROXY": "api.twilio.com,content.twilio.com"},  # "" is no answer
])
def test_a_proxy_variable_requests_would_not_use_stops_nothing(env):
    """Refused, they stopped a start whose calls to Twilio would never have used them."""
    Settings.from_env({**BASE, **env})


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_ca_bundle_that_is_not_there_names_its_variable(variable, tmp_path):
    """Accepted, it failed every create with a 502 saying the message may or may not have been accepted."""
    with pytest.raises(ConfigError, match=rf"^{variable} names '/nonexistent/ca.pem'"):
        Settings.from_env({**BASE, variable: "/nonexistent/ca.pem"})
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    with pytest.raises(ConfigError, match=variable):  # used as it is, trailing space and all
        Settings.from_env({**BASE, variable: f"{bundle} "})


def test_reroute_settings_that_can_never_take_effect_are_named():
    """HOLD_ON_REROUTE=true or a fallback with every action `block` started without a word, and nothing was ever
    held or rerouted; create_app now warns with what is unused."""
    assert Settings.from_env({**BASE, "HOLD_ON_REROUTE": "true"}).unused_reroute_settings() == "HOLD_ON_REROUTE"
    assert Settings.from_env({**BASE, "OUT_OF_WINDOW_ACTION": "block", "FALLBACK_CONTENT_SID": HX}
                             ).unused_reroute_settings() == "FALLBACK_CONTENT_SID"
    assert Settings.from_env({**BASE, "HOLD_ON_REROUTE": "true", "FALLBACK_CONTENT_SID": HX}
                             ).unused_reroute_settings() is None  # reroute is then the default action
    assert Settings.from_env(BASE).unused_reroute_settings() is None


def test_a_real_account_never_uses_the_sandboxs_database():
    """`sandbox up` refuses the real mode's database; the real mode took the sandbox's, exported in a shell for the
    sandbox's commands, and would have judged real sends by simulated windows."""
    from pathlib import Path

    import proxy
    from proxy.sandbox.simulator import SANDBOX_ACCOUNT_SID, SANDBOX_AUTH_TOKEN

    sandbox = f"sqlite:///{Path(proxy.__file__).resolve().parents[1] / 'instance' / 'sandbox.sqlite3'}"
    with pytest.raises(ConfigError, match="DATABASE_URL is the sandbox's database"):
        Settings.from_env({**BASE, "DATABASE_URL": sandbox})
    sandboxed = Settings.from_env({"TWILIO_ACCOUNT_SID": SANDBOX_ACCOUNT_SID, "TWILIO_AUTH_TOKEN": SANDBOX_AUTH_TOKEN,
                                   "DATABASE_URL": sandbox})
    assert sandboxed.database_url.endswith("sandbox.sqlite3")  # the sandbox's own commands still use it
