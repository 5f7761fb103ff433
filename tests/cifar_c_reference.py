"""An independent per-image reference for the CIFAR-10-C corruptions, written from the formulas of
Hendrycks & Dietterich's CIFAR generator with the libraries it used (numpy, scipy, scikit-image,
Pillow, OpenCV): one HxWx3 uint8 image at a time, in float64. Random draws are arguments, so a test
can feed the draws the batched torch version made and compare the outputs pixel by pixel.
Used by tests/test_corruptions.py and timed against exp_corruption.corrupt by tests/bench_corruptions.py.
"""
import io

import cv2
import numpy as np
import skimage.color
import skimage.filters
import skimage.util
from PIL import Image
from scipy import ndimage

import exp_corruption


def to_u8(x):
    """Clip, scale, truncate: how every generated array became the released uint8 files."""
    return np.uint8(np.clip(x, 0, 1) * 255)


def sk_gaussian(x, sigma, mode="nearest", truncate=4.0):
    return skimage.filters.gaussian(x, sigma=sigma, mode=mode, truncate=truncate,
                                    channel_axis=-1 if x.ndim == 3 else None, preserve_range=True)


def zoom_crop(img, z):
    """Crop the centre ceil(n / z), zoom it by z (linear), keep the centre n."""
    n = img.shape[0]
    ch = int(np.ceil(n / z))
    top = (n - ch) // 2
    out = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z) + (1,) * (img.ndim - 2), order=1)
    t = (out.shape[0] - n) // 2
    return out[t:t + n, t:t + n]


def defocus_kernel(radius, blur):
    t = np.arange(-8, 9)
    xx, yy = np.meshgrid(t, t)
    disk = np.array(xx ** 2 + yy ** 2 <= radius ** 2, dtype=np.float32)
    disk /= disk.sum()
    return cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=blur)


def plasma(size, decay, uniforms):
    """Diamond-square; `uniforms()` returns U[0, 1) arrays of a requested shape (the torch draws)."""
    m = np.zeros((size, size))
    step, w = size, 100.0
    noisy = lambda a: a / 4 + w * (-w + 2 * w * uniforms(a.shape))
    while step >= 2:
        h = step // 2
        c = m[0::step, 0::step]
        s = c + np.roll(c, -1, axis=0)
        s = s + np.roll(s, -1, axis=1)
        m[h::step, h::step] = noisy(s)
        d, c = m[h::step, h::step], m[0::step, 0::step]
        top = noisy(d + np.roll(d, 1, axis=0) + c + np.roll(c, -1, axis=1))
        left = noisy(d + np.roll(d, 1, axis=1) + c + np.roll(c, -1, axis=0))
        m[0::step, h::step], m[h::step, 0::step] = top, left
        step, w = h, w / decay
    m -= m.min()
    return m / m.max()


def deterministic(u8, name, severity):
    """The corruptions without randomness; u8 is HxWx3."""
    c = exp_corruption.SEVERITY[name][severity - 1]
    x = u8 / 255.0
    if name == "gaussian_blur":
        return to_u8(sk_gaussian(x, c))
    if name == "defocus_blur":
        k = defocus_kernel(*c)
        return to_u8(np.stack([cv2.filter2D(x[:, :, i], -1, k) for i in range(3)], -1))
    if name == "zoom_blur":
        xf = x.astype(np.float32)
        acc = np.zeros_like(xf)
        zs = np.arange(1, c, 0.01)
        for z in zs:
            acc += zoom_crop(xf, z)
        return to_u8((xf + acc) / (len(zs) + 1))
    if name == "contrast":
        m = x.mean(axis=(0, 1), keepdims=True)
        return to_u8((x - m) * c + m)
    if name in ("brightness", "saturate"):
        hsv = skimage.color.rgb2hsv(x)
        if name == "brightness":
            hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
        else:
            hsv[:, :, 1] = np.clip(hsv[:, :, 1] * c[0] + c[1], 0, 1)
        return to_u8(skimage.color.hsv2rgb(hsv))
    if name == "pixelate":
        n = u8.shape[0]
        img = Image.fromarray(u8).resize((int(n * c),) * 2, Image.BOX).resize((n, n), Image.BOX)
        return np.asarray(img)
    if name == "jpeg_compression":
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, "JPEG", quality=c)
        return np.asarray(Image.open(buf))
    raise KeyError(name)


def glass(u8, severity, shifts):
    """shifts: (passes, positions, 2) of (dx, dy)."""
    sigma, d, passes = exp_corruption.SEVERITY["glass_blur"][severity - 1]
    n = u8.shape[0]
    x = to_u8(sk_gaussian(u8 / 255.0, sigma))
    for it in range(passes):
        j = 0
        for h in range(n - d, d, -1):
            for w in range(n - d, d, -1):
                dx, dy = shifts[it, j]
                # the generator's statement as it is: on numpy views it copies (h + dy, w + dx) into (h, w)
                x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
                j += 1
    return to_u8(sk_gaussian(x / 255.0, sigma))


def fog(u8, severity, uniforms):
    c = exp_corruption.SEVERITY["fog"][severity - 1]
    x = u8 / 255.0
    top = x.max()
    x = x + c[0] * plasma(u8.shape[0], c[1], uniforms)[..., None]
    return to_u8(x * top / (top + c[0]))


def elastic(u8, severity, affine_u, field_x, field_y):
    """affine_u: (3, 2) U[0,1) for the control-point shifts; field_x/field_y: (n, n) U[0,1)."""
    n = u8.shape[0]
    alpha, sigma, shift = (v * n for v in exp_corruption.SEVERITY["elastic_transform"][severity - 1])
    x = np.array(u8, dtype=np.float32) / 255.0
    centre, sq = np.float32([n, n]) // 2, n // 3
    src = np.float32([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])
    dst = src + (-shift + 2 * shift * affine_u).astype(np.float32)
    x = cv2.warpAffine(x, cv2.getAffineTransform(src, dst), (n, n), borderMode=cv2.BORDER_REFLECT_101)
    dx = (sk_gaussian(2 * field_x - 1, sigma, "reflect", 3) * alpha).astype(np.float32)[..., None]
    dy = (sk_gaussian(2 * field_y - 1, sigma, "reflect", 3) * alpha).astype(np.float32)[..., None]
    cx, cy, cz = np.meshgrid(np.arange(n), np.arange(n), np.arange(3))
    coords = (cy + dy).reshape(-1, 1), (cx + dx).reshape(-1, 1), cz.reshape(-1, 1)
    return to_u8(ndimage.map_coordinates(x, coords, order=1, mode="reflect").reshape(n, n, 3))


def spatter(u8, severity, normal):
    """normal: (n, n) standard normal draws for the liquid layer."""
    c = exp_corruption.SEVERITY["spatter"][severity - 1]
    x = np.array(u8, dtype=np.float32) / 255.0
    liquid = sk_gaussian(c[0] + c[1] * normal, c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        lu8 = (liquid * 255).astype(np.uint8)
        dist = 255 - cv2.Canny(lu8, 50, 150)
        dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
        dist = np.minimum(dist, 20)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32))
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = np.repeat((lu8 * dist)[..., None], 3, axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            m = m / m.max(axis=(0, 1)) * c[4]
        out = np.clip(x + m * np.float32([175, 238, 238]) / 255, 0, 1) * 255
        return np.nan_to_num(out, nan=0).astype(np.uint8)
    m = np.where(liquid > c[3], 1, 0)
    m = sk_gaussian(m.astype(np.float32), c[4])
    m[m < 0.8] = 0
    colour = np.float32([63, 42, 20]) / 255 * m[..., None]
    return to_u8(x * (1 - m[..., None]) + colour)


def noise(u8, name, severity, rng):
    """The random noises drawn by numpy, for the speed comparison (their equivalence is tested by
    distribution, not pixel by pixel)."""
    c = exp_corruption.SEVERITY[name][severity - 1]
    x = u8 / 255.0
    if name == "gaussian_noise":
        return to_u8(x + rng.normal(size=x.shape, scale=c))
    if name == "shot_noise":
        return to_u8(rng.poisson(x * c) / c)
    if name == "impulse_noise":
        return to_u8(skimage.util.random_noise(x, mode="s&p", amount=c, rng=rng))
    return to_u8(x + x * rng.normal(size=x.shape, scale=c))
