/**
 * A small readers-writer lock: reads of an image may run in parallel (callers split big reads
 * into concurrent pieces), while anything that changes tables or refcounts runs alone. Without
 * it, a read could follow an L2 entry whose data is not written yet, or a cluster freed and
 * reused under it.
 */
export class ReadWriteLock {
  private readers = 0;
  private writing = false;
  private readonly waiting: Array<{ write: boolean; wake: () => void }> = [];

  async read<T>(body: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await body();
    } finally {
      this.readers -= 1;
      this.pump();
    }
  }

  async write<T>(body: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await body();
    } finally {
      this.writing = false;
      this.pump();
    }
  }

  private acquire(write: boolean): Promise<void> {
    // Queue behind waiting writers too, so a stream of reads cannot starve a write.
    if (!this.writing && this.waiting.length === 0 && (write ? this.readers === 0 : true)) {
      if (write) this.writing = true;
      else this.readers += 1;
      return Promise.resolve();
    }
    return new Promise((wake) => this.waiting.push({ write, wake }));
  }

  private pump(): void {
    while (this.waiting.length > 0 && !this.writing) {
      const next = this.waiting[0]!;
      if (next.write) {
        if (this.readers > 0) return;
        this.waiting.shift();
        this.writing = true;
        next.wake();
        return;
      }
      this.waiting.shift();
      this.readers += 1;
      next.wake();
    }
  }
}
