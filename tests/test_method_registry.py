"""Methods register with a decorator; one outside the package is found through `method.module`."""
import dataclasses
import sys
import textwrap

import ml_collections
import pytest

from tests.helpers import VOCAB, tiny_dual_config
from vlp_jax.methods.base import Method
from vlp_jax.methods.registry import METHODS, build_method, method_class, register_method
from vlp_jax.parallel.mesh import make_mesh


def test_builtin_methods_are_registered():
    method_class(ml_collections.ConfigDict(dict(name="contrastive")))
    assert {"contrastive", "slip", "laclip", "aclip", "maskclip", "vilt", "albef"} <= set(METHODS)


def test_a_method_module_named_in_the_config_is_imported_and_built(tmp_path, monkeypatch):
    (tmp_path / "my_vlp_method.py").write_text(textwrap.dedent('''
        import dataclasses
        from vlp_jax.methods.base import Method
        from vlp_jax.methods.registry import register_method

        @register_method("my_method")
        @dataclasses.dataclass
        class MyMethod(Method):
            def loss(self, params, aux, batch, rng, step):
                raise NotImplementedError
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = ml_collections.ConfigDict(dict(
        model=tiny_dual_config(), method=dict(name="my_method", module="my_vlp_method")))
    try:
        method = build_method(config, VOCAB, make_mesh(devices=None))
        assert type(method).__name__ == "MyMethod" and method.model is not None
    finally:
        METHODS.pop("my_method", None)
        sys.modules.pop("my_vlp_method", None)


def test_unknown_name_lists_the_registered_ones_and_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="'contrastive'"):
        method_class(ml_collections.ConfigDict(dict(name="contrastiv")))

    @dataclasses.dataclass
    class Other(Method):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        register_method("contrastive")(Other)
