"""The fixed workload every system in the benchmark gets: same prompts, same lengths.

Prompts are Thai chat messages of different lengths, so a batch always mixes
prompt lengths (left padding is exercised, as in real traffic).
"""

from __future__ import annotations

PROMPTS = (
    "สวัสดีครับ ช่วยแนะนำตัวหน่อย",
    "สรุปประโยชน์ของการออกกำลังกายเป็นประจำสำหรับผู้สูงอายุ",
    "ประเทศไทยมีจังหวัดกี่จังหวัด ตอบให้ละเอียดพร้อมยกตัวอย่างจังหวัดในภาคเหนือและภาคใต้",
    "ข่าววันนี้เกี่ยวกับเศรษฐกิจไทยและการท่องเที่ยวในช่วงปลายปี มีประเด็นสำคัญอะไรบ้าง",
    "เขียนคำอธิบายสั้น ๆ ว่าทำไมการนอนหลับให้เพียงพอจึงสำคัญต่อสุขภาพ",
    "แปลประโยคนี้เป็นภาษาอังกฤษ: วันนี้อากาศดีมาก เราไปเที่ยวทะเลกันเถอะ",
    "อธิบายความแตกต่างระหว่างรถยนต์ไฟฟ้ากับรถยนต์ที่ใช้น้ำมัน",
    "ช่วยเขียนอีเมลขอบคุณลูกค้าที่สั่งซื้อสินค้าเป็นประจำ",
)


def prompt(i: int) -> str:
    return PROMPTS[i % len(PROMPTS)]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt(i)}]


def requests_for(concurrency: int, rounds: int, minimum: int) -> int:
    """How many requests one concurrency level sends: ``rounds`` waves, at least ``minimum``."""
    return max(minimum, rounds * concurrency)
