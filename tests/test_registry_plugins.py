"""Third-party backend plug-ins (entry points of the group ``trak_core.backends``), broken and working.

Each test installs fake distributions for real: a ``*.dist-info`` folder (METADATA and entry_points.txt)
and the plug-in's module, both under ``tmp_path`` on ``sys.path``, so ``importlib.metadata`` finds them
(with their distribution) exactly as it finds an installed package.
"""
import importlib
import sys
import textwrap
import warnings

import pytest

from trak_core import MLP, TRAK, BackendError, MissingFrameworkError, TrakTypeError
from trak_core.backends import BackendPluginWarning, registry

# A working plug-in: the reference backend under another name, owning what OWNS says.
PLUGIN = """
from trak_core.backends.numpy_backend import ArrayAPIBackend


class Special:
    pass


class Plugin(ArrayAPIBackend):
    name, framework, extra = {name!r}, {framework!r}, {extra!r}

    def owns(self, model):
        return {owns}


backend = Plugin()


def make():
    return Plugin()
"""


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(dist, entry_points, modules)``: a distribution ``dist`` 1.2 declaring ``entry_points``."""
    monkeypatch.setattr(registry, "_loaded", {})
    monkeypatch.setattr(registry, "_registered", {})
    monkeypatch.setattr(registry, "_warned", set(), raising=False)  # each test's plug-ins are warned about anew
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def install(dist, entry_points, modules):
        info = tmp_path / f"{dist.replace('-', '_')}-1.2.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2\n")
        (info / "entry_points.txt").write_text("[trak_core.backends]\n"
                                               + "".join(f"{name} = {value}\n" for name, value in entry_points.items()))
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            written.append(module)
        importlib.invalidate_caches()

    yield install
    for module in written:
        sys.modules.pop(module, None)


def plugin(name, framework="numpy", extra=None, owns="False"):
    return PLUGIN.format(name=name, framework=framework, extra=extra, owns=owns)


def assert_names_all(text, *parts):
    missing = [part for part in parts if part not in text]
    assert not missing, f"{missing} not in: {text}"


BROKEN = [("raise ImportError('acme needs libacme.so')", MissingFrameworkError, "ImportError: acme needs libacme.so"),
          ("backend = object()", TrakTypeError, "is not a trak_core Backend"),
          ("raise RuntimeError('acme failed to start')", BackendError, "RuntimeError: acme failed to start"),
          ("x = 1", BackendError, "has no attribute 'backend'")]


@pytest.mark.parametrize("source,error,problem", BROKEN)
def test_a_broken_plugin_leaves_inference_of_other_models_working(install, source, error, problem):
    install("acme-broken", {"acme": "acme_broken_mod:backend"}, {"acme_broken_mod": source})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first-party backend owns it: no plug-in is loaded
        assert TRAK(MLP(3, 2, 2)).backend.name == "numpy"
    with pytest.warns(RuntimeWarning) as record, pytest.raises(TypeError, match="no installed backend recognises"):
        registry.infer_backend(object())  # every backend is asked: the broken one is skipped
    assert [w.category.__name__ for w in record] == ["BackendPluginWarning"]
    assert_names_all(str(record[0].message), "'acme = acme_broken_mod:backend'", "'acme-broken 1.2'", problem,
                     "pip uninstall acme-broken")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per plug-in per process (above)
        assert "acme" not in registry.available_backends()


@pytest.mark.parametrize("source,error,problem", BROKEN)
def test_get_backend_of_a_broken_plugin_names_entry_point_distribution_and_fix(install, source, error, problem):
    install("acme-broken", {"acme": "acme_broken_mod:backend"}, {"acme_broken_mod": source})
    with pytest.raises(error) as info:
        registry.get_backend("acme")
    assert_names_all(str(info.value), "backend 'acme'", "'acme = acme_broken_mod:backend'", "'acme-broken 1.2'",
                     problem, "pip install --force-reinstall acme-broken", "pip uninstall acme-broken")
    assert info.value.__cause__ is not None


def test_an_entry_point_whose_module_is_missing_names_the_module(install):
    install("aa-dist", {"aa-missingmod": "aa_not_installed_mod:backend"}, {})
    with pytest.raises(MissingFrameworkError) as info:
        registry.get_backend("aa-missingmod")
    text = str(info.value)
    assert_names_all(text, "module 'aa_not_installed_mod' is not installed", "'aa-missingmod = "
                     "aa_not_installed_mod:backend'", "'aa-dist 1.2'", "pip uninstall aa-dist")
    assert "None" not in text
    assert TRAK(MLP(3, 2, 2)).backend.name == "numpy"
    with pytest.warns(RuntimeWarning, match="aa_not_installed_mod"), pytest.raises(TypeError, match="no installed"):
        registry.infer_backend(object())


def test_an_entry_point_named_unlike_its_backend_is_refused(install):
    install("acme-trak", {"acme-alias": "acme_alias_mod:backend"}, {"acme_alias_mod": plugin("acme", owns="True")})
    with pytest.raises(BackendError) as info:
        registry.get_backend("acme-alias")
    assert_names_all(str(info.value), "'acme-alias'", "named 'acme'", "'acme-alias = acme_alias_mod:backend'",
                     "'acme-trak 1.2'", "Make them equal")
    with pytest.warns(RuntimeWarning, match="named 'acme'"):
        assert "acme-alias" not in registry.available_backends()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once (above)
        with pytest.raises(TypeError, match="no installed backend"):
            registry.infer_backend(object())  # the plug-in would own it, but it cannot be used


def test_a_plugin_whose_framework_is_missing_is_not_available_nor_hinted_as_a_trak_core_extra(install):
    install("acme-trak", {"acme": "acme_fw_mod:backend"},
            {"acme_fw_mod": plugin("acme", framework="acme_framework_not_installed", extra="gpu")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # missing, not broken: no warning
        available = registry.available_backends()
    assert "acme" not in available and "numpy" in available
    with pytest.raises(MissingFrameworkError) as info:
        registry.get_backend("acme")
    assert_names_all(str(info.value), "'acme_framework_not_installed' is not installed", 'pip install "acme-trak[gpu]"')
    assert "trak-core[" not in str(info.value)


def test_first_party_backends_are_asked_before_a_greedy_plugin(install):
    install("aaa-trak", {"aaa-greedy": "aaa_greedy_mod:backend"}, {"aaa_greedy_mod": plugin("aaa-greedy", owns="True")})
    assert registry.infer_backend(MLP(3, 2, 2)).name == "numpy"
    assert registry.infer_backend(object()).name == "aaa-greedy"  # what no first-party backend owns


def test_a_greedy_plugin_cannot_take_over_torch_modules(install):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: the torch backend is not exercised")
    install("aaa-trak", {"aaa-greedy": "aaa_greedy_mod:backend"}, {"aaa_greedy_mod": plugin("aaa-greedy", owns="True")})
    assert registry.infer_backend(torch.nn.Linear(2, 2)).name == "torch"


def test_a_factory_plugin_works_next_to_a_broken_one(install):
    install("acme-trak", {"acme": "acme_factory_mod:make"},
            {"acme_factory_mod": plugin("acme", owns="isinstance(model, Special)")})
    install("aab-broken", {"aab": "aab_broken_mod:backend"}, {"aab_broken_mod": "raise ImportError('no libaab')"})
    with pytest.warns(RuntimeWarning, match="no libaab"):
        assert "acme" in registry.available_backends()
    special = sys.modules["acme_factory_mod"].Special()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # aab-broken was said once (above)
        backend = registry.infer_backend(special)
    assert backend.name == "acme" and type(backend).__module__ == "acme_factory_mod"
    assert registry.get_backend("acme") is backend


def test_register_backend_refuses_a_name_that_is_not_the_backends():
    from trak_core.backends import BackendError, BackendPluginWarning, numpy_backend, register_backend

    assert issubclass(BackendPluginWarning, RuntimeWarning)  # importable where the other backend names are
    with pytest.raises(BackendError, match=r"name='alias' differs from the backend's name 'numpy'.*could not be "
                                           r"reopened"):
        register_backend(numpy_backend.ArrayAPIBackend(), name="alias")


def test_a_plugin_whose_owns_raises_is_skipped_with_a_warning(install):
    install("aac-trak", {"aac-raising": "aac_raising_mod:backend"},
            {"aac_raising_mod": plugin("aac-raising", owns="model.acme_only_attribute")})
    install("acme-trak", {"acme": "acme_factory_mod:make"},
            {"acme_factory_mod": plugin("acme", owns="isinstance(model, Special)")})
    special = sys.modules.get("acme_factory_mod") or importlib.import_module("acme_factory_mod")
    with pytest.warns(RuntimeWarning) as record:
        assert registry.infer_backend(special.Special()).name == "acme"  # asked after aac-raising, by name
    assert [w.category.__name__ for w in record] == ["BackendPluginWarning"]
    assert_names_all(str(record[0].message), "'aac-raising'", "'aac-raising = aac_raising_mod:backend'",
                     "'aac-trak 1.2'", "AttributeError", "acme_only_attribute", "return False", "backend=...")
    assert registry.infer_backend(MLP(3, 2, 2)).name == "numpy"  # a first-party backend owns it before the plug-in


def test_a_plugin_cannot_take_a_first_party_name(install):
    """A plug-in named ``numpy`` replaced the reference backend with no word (scores 48% off in an audit)."""
    from trak_core.backends import BackendPluginWarning, numpy_backend, register_backend

    install("evil-trak", {"numpy": "evil_numpy_mod:backend"}, {"evil_numpy_mod": plugin("numpy", owns="True")})
    with pytest.warns(BackendPluginWarning) as record:
        backend = registry.get_backend("numpy")
        inferred = registry.infer_backend(MLP(3, 2, 2))
    assert type(backend).__module__ == type(inferred).__module__ == "trak_core.backends.numpy_backend"
    assert_names_all(str(record[0].message), "'numpy = evil_numpy_mod:backend'", "'evil-trak 1.2'",
                     "trak-core's own backend 'numpy'", "rename it")
    with pytest.raises(BackendError, match="'numpy' is trak-core's own backend.*another name"):
        register_backend(numpy_backend.ArrayAPIBackend())


def test_a_name_two_plugins_declare_is_used_by_neither(install):
    install("acme-trak", {"acme": "acme_factory_mod:make"}, {"acme_factory_mod": plugin("acme", owns="True")})
    install("rival-trak", {"acme": "rival_mod:backend"}, {"rival_mod": plugin("acme", owns="True")})
    with pytest.raises(BackendError) as info:
        registry.get_backend("acme")
    assert_names_all(str(info.value), "declared twice", "'acme-trak 1.2'", "'rival-trak 1.2'", "Uninstall one")
    with pytest.warns(BackendPluginWarning, match="declared twice"):
        assert "acme" not in registry.available_backends()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once (above)
        with pytest.raises(TrakTypeError, match="no installed backend"):
            registry.infer_backend(object())


def test_a_broken_plugins_fix_speaks_to_its_maintainer_too(install):
    install("aad-trak", {"aad": "aad_mod:backend"}, {"aad_mod": "x = 1"})
    with pytest.raises(BackendError) as info:
        registry.get_backend("aad")
    assert_names_all(str(info.value), "if you maintain it, fix its target 'aad_mod:backend'", "pip uninstall aad-trak")


def test_a_broken_plugin_is_warned_about_once_per_process(install):
    """Every listing and inference skips a broken plug-in again; under simplefilter("always") each one warned anew
    (three calls: three identical warnings)."""
    install("acme-broken", {"acme": "acme_broken_mod:backend"},
            {"acme_broken_mod": "raise RuntimeError('acme failed to start')"})
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        registry.available_backends()
        registry.available_backends()
        with pytest.raises(TypeError, match="no installed backend"):
            registry.infer_backend(object())
    assert [w.category for w in got] == [BackendPluginWarning]
    assert "acme_broken_mod:backend" in str(got[0].message) and "acme failed to start" in str(got[0].message)


def test_a_registered_backend_whose_owns_raises_is_warned_about_once_until_registered_again(install):
    from trak_core.backends import register_backend, numpy_backend

    class Raising(numpy_backend.ArrayAPIBackend):
        name = "aae-raising"

        def owns(self, model):
            raise RuntimeError("owns is broken")

    register_backend(Raising())
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(TypeError, match="no installed backend"):
                registry.infer_backend(object())
        assert len(got) == 1 and "owns is broken" in str(got[0].message)
        register_backend(Raising())  # another object under the name: its failure is its own
        with pytest.raises(TypeError, match="no installed backend"):
            registry.infer_backend(object())
    assert [w.category for w in got] == [BackendPluginWarning] * 2
