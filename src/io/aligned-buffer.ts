/**
 * Page-aligned buffers for bulk copies.
 *
 * The kernel copies a pread/pwrite buffer with `rep movsb`, which runs at full speed only when
 * the user buffer starts on a cache-line boundary. Large ArrayBuffers come from malloc, whose
 * mmap'd chunks start 16 bytes into a page: measured here, reading 512 MiB from the page cache
 * into such a buffer cost 2-2.5x the kernel time of reading into an aligned one (qemu-img aligns
 * its buffers, which was most of its lead in raw -> qcow2 convert). JavaScript cannot ask for an
 * address, but a WebAssembly.Memory is mapped by V8 on page boundaries, so its buffer is
 * page-aligned at offset 0 and every multiple of 4 KiB after it.
 */

const WASM_PAGE = 64 * 1024;

/** The one WebAssembly constructor used here (the project's lib settings do not declare WebAssembly). */
interface WasmMemoryConstructor {
  new (descriptor: { initial: number }): { readonly buffer: ArrayBuffer };
}
const WasmMemory = (globalThis as { WebAssembly?: { Memory?: WasmMemoryConstructor } }).WebAssembly?.Memory;

/** A zero-filled buffer of `size` bytes whose start is page-aligned when the platform allows it. */
export function allocateAligned(size: number): Uint8Array {
  if (size <= 0) return new Uint8Array(0);
  if (WasmMemory === undefined) return new Uint8Array(size);
  try {
    const memory = new WasmMemory({ initial: Math.ceil(size / WASM_PAGE) });
    return new Uint8Array(memory.buffer, 0, size);
  } catch {
    // Address space limits (ulimit -v): correct, only slower.
    return new Uint8Array(size);
  }
}
