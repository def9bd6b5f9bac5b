"""The documentation site: `mkdocs build --strict` passes, the API reference covers every
public name of every module of the package (modules are discovered, so a new one is
flagged until mkdocs.yml lists it), and a headless Chromium renders the landing page and
an API page with no missing asset and no console error."""
import functools
import http.server
import importlib
import inspect
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys
import threading
import zlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings")
yaml = pytest.importorskip("yaml")


def all_modules() -> list[str]:
    import lottojax

    return ["lottojax"] + [m.name for m in pkgutil.walk_packages(lottojax.__path__, "lottojax.")]


def public_names(module_name: str) -> list[str]:
    """``__all__``, else the functions, classes and constants the module itself defines."""
    module = importlib.import_module(module_name)
    if hasattr(module, "__all__"):
        return list(module.__all__)
    source = inspect.getsource(module)
    names = []
    for name, value in vars(module).items():
        if name.startswith("_") or inspect.ismodule(value):
            continue
        if getattr(value, "__module__", None) == module_name or re.search(rf"^{re.escape(name)}\s*[:=]", source, re.M):
            names.append(name)
    return names


def listed_modules() -> list[str]:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # skips !!python tags
    return list(config["extra"]["api_modules"])


def inventory(site: pathlib.Path) -> set[str]:
    """The object names in the site's Sphinx inventory (``objects.inv``, written by mkdocstrings)."""
    header, _, body = site.joinpath("objects.inv").read_bytes().partition(b"zlib.\n")
    return {line.split(" ", 1)[0] for line in zlib.decompress(body).decode().splitlines()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_every_module_of_the_package_has_a_reference_page():
    missing = sorted(set(all_modules()) - set(listed_modules()))
    assert not missing, f"add {missing} to extra.api_modules in mkdocs.yml (one line each)"
    unknown = sorted(set(listed_modules()) - set(all_modules()))
    assert not unknown, f"mkdocs.yml lists modules that do not exist: {unknown}"


def test_reference_documents_every_public_name(site):
    documented = inventory(site)
    import griffe

    package = griffe.load("lottojax", search_paths=[str(ROOT / "src")])

    def where(path: str) -> str:  # a re-exported name is documented where it is defined
        module, name = path.rsplit(".", 1)
        parent = package if module == "lottojax" else package[module.split(".", 1)[1]]
        if name in parent.imports:
            return parent.imports[name]
        member = parent.members.get(name)
        return path if member is None else member.target_path if member.is_alias else member.path

    missing = [f"{module}.{name}" for module in all_modules() for name in public_names(module)
               if f"{module}.{name}" not in documented and where(f"{module}.{name}") not in documented]
    assert not missing, f"public names missing from the API reference (add a docstring or list the module): {missing}"
    index = (site / "api" / "index.html").read_text()
    import lottojax

    unlinked = [n for n in lottojax.__all__ if f">{n}</code>" not in index]
    assert not unlinked, f"lottojax.__all__ names not in api/index.md: {unlinked}"


def test_guides_link_to_the_experiment_figures(site):
    for page, figure in [("benchmarks", None), ("guides/lottery", "lottery_mnist1d.png"),
                         ("guides/jackpots", "jackpots_mnist1d.png"), ("guides/grokking", "grokking_mlp_p67.png")]:
        html = (site / page / "index.html").read_text()
        if figure:
            assert figure in html, f"{page} does not show {figure}"
    for png in re.findall(r'src="([^"]+\.png)"', (site / "guides" / "lottery" / "index.html").read_text()):
        assert (site / "guides" / "lottery" / png).resolve().exists(), png


def python_blocks(path: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_getting_started_shows_the_readme_blocks():
    """The README's blocks (run by tests/test_readme.py) and the site's copies stay the same."""
    assert python_blocks(ROOT / "docs" / "getting-started.md") == python_blocks(ROOT / "README.md")


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs" / "guides").glob("*.md") if python_blocks(p)))
def test_guide_code_blocks_run(page, capsys):
    """The guides' Python blocks run as written, each page in one namespace."""
    namespace: dict = {}
    for block in python_blocks(ROOT / "docs" / "guides" / page):
        exec(compile(block, page, "exec"), namespace)


def chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class _Server(http.server.SimpleHTTPRequestHandler):
    missing: list

    def log_message(self, *args):
        pass

    def send_error(self, code, *args, **kwargs):
        if code == 404:
            self.missing.append(self.path)
        super().send_error(code, *args, **kwargs)


@pytest.mark.skipif(chromium() is None, reason="no Chromium: apt-get install chromium")
@pytest.mark.parametrize("page", ["", "api/lottojax.masks/"])
def test_site_renders_in_headless_chromium(site, page, tmp_path):
    handler = type("Handler", (_Server,), {"missing": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    shot = tmp_path / "page.png"
    try:
        done = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1000",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=4000", f"--screenshot={shot}",
             f"http://127.0.0.1:{server.server_port}/{page}"],
            capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert shot.exists() and shot.stat().st_size > 20_000, done.stderr[-2000:]
    assert not handler.missing, f"missing assets: {handler.missing}"
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "console messages: " + "\n".join(console)
