// The one live connection: Server-Sent Events from /api/stream. The browser reconnects by itself after a
// loss (the server asks for 1 s); the banner shows meanwhile, and the snapshot that opens every
// connection brings the page up to date without a reload.

export function connect(handlers) {
  const banner = document.getElementById("banner");
  let source = null;
  let lost = null;

  function open() {
    source = new EventSource("/api/stream");
    source.onmessage = (message) => {
      const data = JSON.parse(message.data);
      if (data.t === "snapshot") {
        banner.hidden = true;
        lost = null;
      }
      handlers[data.t]?.(data);
    };
    source.onerror = () => {
      banner.hidden = false;
      lost = lost || Date.now();
      if (source.readyState === EventSource.CLOSED) {  // the browser gave up (e.g. an HTTP error): try again
        source.close();
        setTimeout(open, 1000);
      }
    };
  }
  open();
  return { lostSince: () => lost };
}
