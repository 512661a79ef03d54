// A Server-Sent Events stream that comes back by itself. On any error the EventSource
// is closed and a new one opened (after a growing pause) with ?lastEventId= set to the
// last id seen, so the server sends what was missed, and a URL made anew (a fresh token
// for the gateway). Each event is applied by (author, id), so one sent twice changes
// nothing.

const DELAYS = [250, 1000, 2000, 4000, 8000, 15000];

export class Stream {
  /**
   * @param {object} o
   * @param {string} o.name           for the banner
   * @param {(lastId: string|null) => Promise<string>} o.url
   * @param {Record<string, (data: any) => void>} o.events
   * @param {(up: boolean) => void} o.onState
   * @param {(resumed: boolean) => void} [o.onOpen]   resumed: opened with a last id
   * @param {() => Promise<void>} [o.beforeRetry]     e.g. check the token is still good
   */
  constructor(o) {
    Object.assign(this, o);
    this.lastId = null;
    this.es = null;
    this.up = null; // unknown until the first open or error
    this.attempt = 0;
    this.timer = null;
    this.stopped = true;
    this.onOnline = () => this.retryNow();
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    window.addEventListener('online', this.onOnline);
    this.connect();
  }

  stop() {
    this.stopped = true;
    window.removeEventListener('online', this.onOnline);
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    this.es = null;
  }

  retryNow() {
    if (this.stopped || this.es) return;
    clearTimeout(this.timer);
    this.attempt = 0;
    this.connect();
  }

  async connect() {
    this.timer = null;
    let url;
    try {
      if (this.attempt > 0 && this.beforeRetry) await this.beforeRetry();
      url = await this.url(this.lastId);
    } catch {
      if (!this.stopped) this.schedule();
      return;
    }
    if (this.stopped) return;
    const es = new EventSource(url);
    this.es = es;
    const resumed = this.lastId !== null;
    es.onopen = () => {
      if (this.es !== es) return;
      this.attempt = 0;
      this.setUp(true);
      if (this.onOpen) this.onOpen(resumed);
    };
    es.onerror = () => {
      if (this.es !== es) return;
      es.close();
      this.es = null;
      this.setUp(false);
      if (!this.stopped) this.schedule();
    };
    for (const [type, fn] of Object.entries(this.events)) {
      es.addEventListener(type, (e) => {
        if (this.es !== es) return;
        let data;
        try {
          data = JSON.parse(e.data);
        } catch {
          return;
        }
        if (e.lastEventId) this.lastId = e.lastEventId;
        fn(data);
      });
    }
  }

  schedule() {
    const base = DELAYS[Math.min(this.attempt, DELAYS.length - 1)];
    this.attempt++;
    this.timer = setTimeout(() => this.connect(), base + Math.random() * base * 0.3);
  }

  setUp(up) {
    if (this.up === up) return;
    this.up = up;
    this.onState(up);
  }
}
