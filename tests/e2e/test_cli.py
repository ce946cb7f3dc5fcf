"""End to end through the installed `clipseek` command: serve, index, search, status, restart."""

import json
import os
import signal
import subprocess
import sys
import time


from flows.serving import free_port

CLI = [sys.executable, "-m", "clipseek.cli"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(tiny_model, workspace, ports):
    env = dict(os.environ)
    env.update(CLIPSEEK_MODEL=tiny_model, CLIPSEEK_WORKSPACE=str(workspace), CLIPSEEK_INDEX_PORT=str(ports[0]),
               CLIPSEEK_SEARCH_PORT=str(ports[1]), CLIPSEEK_DEVICE="cpu", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("CLIPSEEK_HOST", None)
    return env


def _run(args, env, timeout=120):
    return subprocess.run(CLI + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class Server:
    def __init__(self, env, args=()):
        self.proc = subprocess.Popen(CLI + ["serve", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.lines.append(line)
            if "Ctrl-C stops" in line:
                return
        self.stop()
        raise AssertionError("serve did not start:\n" + "".join(self.lines[-40:]))

    def stop(self, sig=signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                out, _ = self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                out, _ = self.proc.communicate()
            self.lines.append(out or "")
        return self.proc.returncode


def test_serve_index_search_restart(tiny_model, picture_dir, tmp_path):
    root, paths = picture_dir
    env = _env(tiny_model, tmp_path / "ws", (free_port(), free_port()))
    server = Server(env)
    try:
        assert "127.0.0.1" in "".join(server.lines)
        out = _run(["index", str(root)], env)
        assert out.returncode == 0, out.stderr
        assert "indexed 4, unchanged 0 (skipped), failed 0" in out.stdout

        (tmp_path / "junk.png").write_bytes(b"junk")
        out = _run(["index", str(root), str(tmp_path / "junk.png")], env)
        assert out.returncode == 1
        assert "indexed 0, unchanged 4 (skipped), failed 1" in out.stdout
        assert f"failed: {tmp_path / 'junk.png'}: " in out.stdout and "not a recognised image format" in out.stdout

        out = _run(["search", "a red circle", "-k", "3", "--json"], env)
        assert out.returncode == 0, out.stderr
        hits = json.loads(out.stdout)
        assert [h["rank"] for h in hits] == [1, 2, 3] and {h["uri"] for h in hits} <= set(paths)

        plot = tmp_path / "hits.png"
        out = _run(["search", "blue", "-k", "4", "--plot", str(plot)], env)
        assert out.returncode == 0, out.stderr
        rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
        assert [r[0] for r in rows] == ["1", "2", "3", "4"] and sorted(r[2] for r in rows) == paths
        assert plot.stat().st_size > 5000 and plot.read_bytes()[:4] == b"\x89PNG"

        status = json.loads(_run(["status", "--json"], env).stdout)
        assert status["count"] == 4 and status["model"] == "tiny-clip"
    finally:
        code = server.stop()
    assert code == 0, "".join(server.lines[-30:])
    assert "clipseek: stopping" in "".join(server.lines)

    # after a clean stop, a new server opens the same index
    server = Server(env)
    try:
        out = _run(["search", "yellow", "-k", "10", "--json"], env)
        assert sorted(h["uri"] for h in json.loads(out.stdout)) == paths
        assert _run(["delete", paths[0]], env).stdout.strip() == "deleted 1"
        assert json.loads(_run(["status", "--json"], env).stdout)["count"] == 3
    finally:
        assert server.stop() == 0


def test_serve_flags_reach_the_flows(tiny_model, tmp_path):
    """--shards, --max-megapixels and --allow-private-urls take effect (not only their environment variables)."""
    import http.server
    import threading

    from PIL import Image

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(pictures / "big.png")  # 3 megapixels
    for name, colour in (("a.png", (30, 200, 30)), ("b.png", (30, 30, 200)), ("c.png", (220, 220, 40))):
        Image.new("RGB", (64, 48), colour).save(pictures / name)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(pictures))  # noqa: E731
    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    env = _env(tiny_model, tmp_path / "ws", (free_port(), free_port()))
    for name in ("CLIPSEEK_SHARDS", "CLIPSEEK_MAX_MEGAPIXELS", "CLIPSEEK_ALLOW_PRIVATE_URLS"):
        env.pop(name, None)
    server = Server(env, ["--shards", "2", "--max-megapixels", "1", "--allow-private-urls"])
    try:
        local = _run(["index", str(pictures / "big.png"), str(pictures / "a.png"), str(pictures / "b.png")], env)
        assert "indexed 2, unchanged 0 (skipped), failed 1" in local.stdout, local.stdout + local.stderr
        assert "big.png" in local.stdout and "megapixels" in local.stdout
        url = f"http://127.0.0.1:{http_server.server_address[1]}/c.png"  # loopback: refused unless allowed
        remote = _run(["index", url], env)
        assert "indexed 1, unchanged 0 (skipped), failed 0" in remote.stdout, remote.stdout + remote.stderr
        assert sorted(os.listdir(tmp_path / "ws" / "SimpleIndexer")) == ["0", "1"]
        assert json.loads(_run(["status", "--json"], env).stdout)["count"] == 3
    finally:
        assert server.stop() == 0
        http_server.shutdown()
    # the console told a short story; the flows' own logs went to the workspace's log file
    said = [line for line in server.lines if line.strip()]
    assert len(said) <= 4 and not any("Flow is ready" in line or "rep-0@" in line for line in said), said
    assert "Flow is ready" in (tmp_path / "ws" / "clipseek.log").read_text()  # jina's own lines


def test_serve_without_the_model_explains_itself(tmp_path):
    env = _env("openai/clip-vit-base-patch32", tmp_path, (free_port(), free_port()))
    # an empty hub cache: the model is missing whatever this machine has downloaded before
    (tmp_path / "hf-home" / "hub").mkdir(parents=True)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(tmp_path / "hf-home" / "hub"))
    out = _run(["serve"], env, timeout=60)
    assert out.returncode == 2
    assert "openai/clip-vit-base-patch32" in out.stderr and "--model DIR" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_serve_refuses_other_hosts_without_bind(tmp_path, tiny_model):
    env = _env(tiny_model, tmp_path, (free_port(), free_port()))
    out = _run(["serve", "--host", "192.0.2.1"], env, timeout=60)
    assert out.returncode == 2 and "--bind" in out.stderr


def test_client_commands_without_a_server(tmp_path, tiny_model):
    env = _env(tiny_model, tmp_path, (free_port(), free_port()))
    out = _run(["status"], env, timeout=60)
    assert out.returncode == 2 and "is `clipseek serve` running?" in out.stderr
    assert "Traceback" not in out.stderr


def test_help_starts_fast():
    out = _run(["--help"], dict(os.environ))
    assert out.returncode == 0 and "serve" in out.stdout and "search" in out.stdout
    modules = subprocess.run([sys.executable, "-c", "import clipseek.cli, sys; print('torch' in sys.modules, 'jina' in sys.modules)"],
                             capture_output=True, text=True, cwd=ROOT).stdout.split()
    assert modules == ["False", "False"]
