//! Arrow IPC files (Feather v2) and streams, decoded from the file's bytes in memory: every
//! offset and length the file declares is checked against the bytes there are before anything
//! is sliced, so a hostile header cannot make the reader allocate what it declares (arrow's
//! readers reserve declared lengths up front), and each byte is decoded once. Batches are
//! zero-copy views of the bytes. (arrow may still panic on a malformed message: the caller
//! catches that.)

use std::sync::Arc;

use arrow::buffer::Buffer;
use arrow::ipc::convert::try_fb_to_schema;
use arrow::ipc::reader::{read_footer_length, FileDecoder, StreamDecoder};
use arrow::record_batch::RecordBatch;

/// The `ARROW1` magic that opens and closes an IPC file.
const MAGIC: &[u8] = b"ARROW1";
/// An IPC stream message's continuation marker.
const CONTINUATION: [u8; 4] = [0xFF; 4];

/// The record batches of `bytes`, an Arrow IPC file or (else) stream.
///
/// # Errors
/// What is wrong with the bytes, as text: the caller names the file.
pub fn read(bytes: Vec<u8>) -> Result<Vec<RecordBatch>, String> {
    let buffer = Buffer::from_vec(bytes);
    if buffer.len() >= 2 * MAGIC.len() + 4 && buffer.starts_with(MAGIC) {
        return file(&buffer).map_err(|e| format!("Arrow IPC file: {e}"));
    }
    stream(buffer).map_err(|e| format!("Arrow IPC stream: {e}"))
}

fn file(buffer: &Buffer) -> Result<Vec<RecordBatch>, String> {
    let trailer_start = buffer.len() - 10;
    let trailer: [u8; 10] = buffer[trailer_start..]
        .try_into()
        .map_err(|_| "no trailer".to_string())?;
    let footer_len = read_footer_length(trailer).map_err(|e| e.to_string())?;
    let footer_start = trailer_start.checked_sub(footer_len).ok_or_else(|| {
        format!(
            "a footer of {footer_len} bytes in a {}-byte file",
            buffer.len()
        )
    })?;
    let footer = arrow::ipc::root_as_footer(&buffer[footer_start..trailer_start])
        .map_err(|e| format!("footer: {e}"))?;
    let schema = footer.schema().ok_or("the footer has no schema")?;
    let schema = Arc::new(try_fb_to_schema(schema).map_err(|e| e.to_string())?);
    let mut decoder = FileDecoder::new(schema, footer.version());
    // Blocks must lie before the footer, in order, without overlapping: a footer that names
    // the same bytes many times would make the decoder copy (or concatenate delta
    // dictionaries) that many times. A message takes 8 bytes at least (marker and length).
    let mut blocks: Vec<(bool, arrow::ipc::Block)> = footer
        .dictionaries()
        .iter()
        .flatten()
        .map(|b| (true, *b))
        .chain(footer.recordBatches().iter().flatten().map(|b| (false, *b)))
        .collect();
    blocks.sort_by_key(|(_, b)| b.offset());
    let mut end = 0usize;
    let mut batches = Vec::new();
    for (dictionary, b) in &blocks {
        let (offset, meta, body) = (b.offset(), b.metaDataLength(), b.bodyLength());
        let fits = usize::try_from(offset).ok().and_then(|o| {
            let meta = usize::try_from(meta).ok().filter(|&m| m >= 8)?;
            let len = meta.checked_add(usize::try_from(body).ok()?)?;
            (o >= end && o.checked_add(len)? <= footer_start).then_some((o, len))
        });
        let (o, len) = fits.ok_or_else(|| {
            format!("a block at {offset} of {meta} + {body} bytes overlaps another or the footer")
        })?;
        end = o + len;
        let bytes = buffer.slice_with_length(o, len);
        if *dictionary {
            decoder
                .read_dictionary(b, &bytes)
                .map_err(|e| e.to_string())?;
        } else if let Some(batch) = decoder
            .read_record_batch(b, &bytes)
            .map_err(|e| e.to_string())?
        {
            batches.push(batch);
        }
    }
    Ok(batches)
}

fn stream(buffer: Buffer) -> Result<Vec<RecordBatch>, String> {
    check_stream_framing(&buffer)?;
    let mut decoder = StreamDecoder::new();
    let mut rest = buffer;
    let mut batches = Vec::new();
    while !rest.is_empty() {
        if let Some(batch) = decoder.decode(&mut rest).map_err(|e| e.to_string())? {
            batches.push(batch);
        }
    }
    // No `finish()`: the framing was checked whole, and a stream may end without its
    // end-of-stream marker.
    Ok(batches)
}

/// Walks the stream's messages (marker, length, message, body) and checks that each message
/// and body lies inside the bytes, so that the decoder only ever slices (it reserves a declared
/// length when the bytes it has are shorter).
fn check_stream_framing(bytes: &[u8]) -> Result<(), String> {
    let mut at = 0usize;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    while at < bytes.len() {
        if bytes.get(at..at + 4) == Some(&CONTINUATION[..]) {
            at += 4;
        }
        let size = u32_at(at).ok_or_else(|| format!("a message length cut off at byte {at}"))?;
        at += 4;
        if size == 0 {
            return Ok(()); // end of stream
        }
        let end = at
            .checked_add(size as usize)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| format!("a {size}-byte message at byte {at} runs past the end"))?;
        let message = arrow::ipc::root_as_message(&bytes[at..end])
            .map_err(|e| format!("the message at byte {at}: {e}"))?;
        let body = usize::try_from(message.bodyLength())
            .ok()
            .and_then(|b| end.checked_add(b))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "a body of {} bytes at byte {end} runs past the end",
                    message.bodyLength()
                )
            })?;
        at = body;
    }
    Ok(())
}
