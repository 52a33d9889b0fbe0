import { QlayerError } from '../errors.js';

/** Errors of the layers: the store, apps, desktops and the recompose. */
export class LayerError extends QlayerError {}
