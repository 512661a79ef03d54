"""The headless Chromium that the web client's tests and its bench drive (Debian's
package; CI installs it), and the flags both launch it with: no sandbox (root in a
container), no GPU, and none of its own network traffic beside the page's."""

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
