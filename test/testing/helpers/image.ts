import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';

/** sha256 of a whole file: the image before and after must be equal (boot() never writes it). */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}
