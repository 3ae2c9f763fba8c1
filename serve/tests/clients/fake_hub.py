"""A loopback stand-in for the Hugging Face hub's file endpoint, enough for hf-hub's client:
GET /{owner}/{repo}/resolve/{revision}/{file} with Range, answering with the ETag,
X-Repo-Commit and Content-Range headers the client reads. Files come from ROOT/{owner}/{repo}/.
A repository that does not exist answers 401 (as the hub does), a missing file 404.

    python fake_hub.py ROOT      # prints the port, then serves until killed
"""
import hashlib
import http.server
import os
import re
import sys

ROOT = sys.argv[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", self.path)
        if not m:
            return self.empty(404)
        owner, repo, _revision, name = m.groups()
        repo_dir = os.path.join(ROOT, owner, repo)
        if not os.path.isdir(repo_dir):
            return self.empty(401)
        path = os.path.join(repo_dir, name)
        if ".." in name or not os.path.isfile(path):
            return self.empty(404)
        data = open(path, "rb").read()
        start, end = 0, len(data) - 1
        r = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if r:
            start = int(r.group(1))
            end = int(r.group(2)) if r.group(2) else end
        body = data[start:end + 1]
        self.send_response(206 if r else 200)
        self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Range", "bytes %d-%d/%d" % (start, end, len(data)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def empty(self, status):
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
print(server.server_address[1], flush=True)
server.serve_forever()
