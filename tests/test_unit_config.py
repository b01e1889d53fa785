import pytest

from shared import config


def test_defaults_env_and_flag_precedence():
    names = config.GATEWAY
    s = config.resolve(names, {}, env={})
    assert s.gateway_port == 50051 and s.redis_url.startswith("redis://")
    s = config.resolve(names, {}, env={"LLAMASHIP_GATEWAY_PORT": "6000"})
    assert s.gateway_port == 6000
    s = config.resolve(names, {"gateway_port": "7000"}, env={"LLAMASHIP_GATEWAY_PORT": "6000"})
    assert s.gateway_port == 7000


@pytest.mark.parametrize("env, needle", [
    ({"LLAMASHIP_GATEWAY_PORT": "70000"}, "--port / LLAMASHIP_GATEWAY_PORT"),
    ({"LLAMASHIP_GATEWAY_PORT": "abc"}, "LLAMASHIP_GATEWAY_PORT"),
    ({"LLAMASHIP_REDIS_URL": "http://x"}, "redis://"),
    ({"LLAMASHIP_QUEUE_MAX_DEPTH": "0"}, "must be > 0"),
])
def test_bad_values_name_the_setting(env, needle):
    with pytest.raises(config.ConfigError) as info:
        config.resolve(config.GATEWAY, {}, env=env)
    assert needle in str(info.value)


def test_bad_pool_rejected():
    with pytest.raises(config.ConfigError, match="cpu, cuda"):
        config.resolve(config.SERVING, {"pool": "tpu"}, env={})


def test_every_setting_is_documented_and_used():
    used = set(config.GATEWAY) | set(config.COMPILER) | set(config.SERVING)
    assert used == set(config.SETTINGS)
    assert all(s.help for s in config.SETTINGS.values())


def test_service_parser_exits_with_clear_message(capsys):
    with pytest.raises(SystemExit):
        config.parse_service_args("x", "x", config.SERVING, ["--slots", "0"])
    assert "--slots / LLAMASHIP_SLOTS" in capsys.readouterr().err
